"""The engine: requests (token ids and pixels) in, tokens out, one step at a time.

Two doors drive the same step (one generation path): herd.llm.LLM in-process through
`Engine.step`, which adds the text (herd.engine.outputs.RequestText) to `Engine.step_tokens`,
and the engine-core process (herd.engine.core) under `herd serve`, which sends the bare tokens of
`Engine.step_tokens` to the API server, where the same RequestText makes the text.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from herd.checkpoint import load_text_model
from herd.config import ModelConfig, load_config
from herd.engine.kv_cache import KVBlockManager, KVCache
from herd.engine.options import (
    EngineOptions,
    check_quantization,
    default_cpu_threads,
    engine_options_from,
    resolve_engine_options,
)
from herd.engine.outputs import CompletionOutput, RequestOutput, RequestText, RequestTokens, SeqTokens, sequence_id
from herd.engine.request import ImageInput, Request
from herd.engine.runner import Runner
from herd.engine.sampling import Sampled, SamplingParams
from herd.engine.scheduler import Scheduler
from herd.model.attention import CHUNKED, GLOBAL
from herd.model.llama4 import warm_up_experts
from herd.model_source import resolve_model_dir  # noqa: F401  (also imported from here)
from herd.structured.manager import GrammarManager
from herd.tokenizer import Tokenizer

log = logging.getLogger("herd.engine")

__all__ = ["CompletionOutput", "Engine", "EngineOptions", "EngineStats", "PromptLimits", "RequestOutput"]


CPU_KV_CACHE_BYTES = 2**30  # the default KV-cache budget on CPU (--kv-cache-tokens overrides)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of which were found
    num_preemptions: int


@dataclass
class PromptLimits:
    """What a prompt must fit, as plain data: the API server checks prompts with these before
    sending them to the engine-core process (and the engine checks them again)."""

    vocab_size: int
    max_model_len: int
    kv_capacity: int | None  # tokens the global KV pool holds; None when no layer keeps them all

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError with a clear message for a request the engine cannot take."""
        vocab = self.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} tokens"
            )
        if self.kv_capacity is not None and len(prompt_ids) + 1 > self.kv_capacity:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the KV cache holds {self.kv_capacity}")
        if params.logit_bias and any(not 0 <= int(t) < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if params.structured_outputs is not None:
            from herd.structured.grammars import validate

            validate(params.structured_outputs)  # a bad schema, regex or grammar: refused now


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # Most CPUs run bf16 matmuls far slower than fp32; GPUs keep the checkpoint's dtype.
        if device.type == "cpu":
            return torch.float32
        dtype = config.dtype if config.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


# generation_config.json field -> SamplingParams field
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults the checkpoint ships (generation_config.json), in SamplingParams names."""
    path = model_dir / "generation_config.json"
    try:
        raw = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
    defaults = {ours: raw[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if raw.get(theirs) is not None}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


class _Group:
    """One submitted request: its n parallel samples share the prompt."""

    def __init__(self, request_id: str, prompt_ids: list[int], prompt: str | None, params: SamplingParams,
                 requests: list[Request]):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.prompt = prompt
        self.params = params
        self.requests = requests
        self.sent_prompt_logprobs = False
        self.text: RequestText | None = None  # made by Engine.step (the in-process door) only

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.requests)

    def tokens(self, seqs: list[SeqTokens]) -> RequestTokens:
        first = self.requests[0]
        prompt_logprobs = None
        if first.params.prompt_logprobs is not None and first.prompt_logprobs is not None:
            if not self.sent_prompt_logprobs:  # they are complete once the first token is sampled
                self.sent_prompt_logprobs = True
                prompt_logprobs = first.prompt_logprobs
        return RequestTokens(self.request_id, seqs, self.finished, first.num_cached_tokens, prompt_logprobs)


class Engine:
    """Owns the model, the KV cache and the scheduler; `step()` advances every request once."""

    def __init__(
        self, model_dir: Path, config: ModelConfig, tokenizer: Tokenizer, model, device, dtype, options, executor=None
    ):
        """`executor(model, cache, device)` makes what runs each step (default: a Runner on one
        device; herd.parallel's executor drives N ranks with the same surface)."""
        self.model_dir = model_dir
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        options = resolve_engine_options(options, config)  # no-op when _load_engine did it
        self.options = options
        text = config.text
        self.max_model_len = options.max_model_len or text.max_position_embeddings
        self.generation_defaults = generation_defaults(model_dir)
        if device.type == "cpu":
            # Subnormal floats (common in random-weight models) make CPU matmuls 100x slower.
            torch.set_flush_denormal(True)
            torch.set_num_threads(options.cpu_threads or default_cpu_threads())
            log.info("CPU: %d torch thread(s) (--cpu-threads)", torch.get_num_threads())
            if hasattr(model, "prepack_for_cpu"):
                log.info("CPU: %d linear layers use oneDNN-packed weights", model.prepack_for_cpu(options.max_num_seqs))
            if isinstance(model, torch.nn.Module):
                warm_up_experts(model, options.max_num_batched_tokens)
        bs = options.block_size
        # The cache holds this device's KV heads: model.config is the rank's local config.
        kv_config = getattr(model, "config", text)
        global_blocks = -(-self._kv_cache_tokens(kv_config, dtype, device) // bs)
        chunked_blocks = global_blocks
        if text.attention_chunk_size is not None:
            # A chunked layer holds at most the current chunk plus one step's tokens per sequence.
            per_seq = text.attention_chunk_size // bs + 2
            chunked_blocks = min(global_blocks, options.max_num_seqs * per_seq + options.max_num_batched_tokens // bs)
        self.cache = KVCache(
            kv_config, {GLOBAL: global_blocks, CHUNKED: chunked_blocks}, bs, dtype, device, options.kv_cache_dtype
        )
        self.blocks = KVBlockManager(self.cache, text.attention_chunk_size, options.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, options.max_num_seqs, options.max_num_batched_tokens)
        self.eos_ids = set(tokenizer.eos_token_ids) | set(text.eos_token_id)
        # Structured outputs: the vocabulary is prepared on first use, grammars compile off the loop.
        self.grammars = GrammarManager(tokenizer, text.vocab_size, self.eos_ids)
        self.runner = (executor or Runner)(model, self.cache, device, grammars=self.grammars)
        global_pool = self.cache.pools.get(GLOBAL)
        self.limits = PromptLimits(
            text.vocab_size, self.max_model_len,
            global_pool.num_blocks * self.cache.block_size if global_pool is not None else None,
        )
        self._groups: dict[str, _Group] = {}
        self._group_of: dict[str, _Group] = {}  # sequence request id -> its group
        self._ids = itertools.count()

    def _kv_cache_tokens(self, text, dtype, device) -> int:
        if self.options.kv_cache_tokens:
            return self.options.kv_cache_tokens
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            per_token = KVCache.bytes_per_token(text, dtype, self.options.kv_cache_dtype)
            return int(free * self.options.gpu_memory_utilization) // per_token
        # CPU: room for several full contexts (at least 64K tokens), within a fixed memory budget.
        per_token = KVCache.bytes_per_token(text, dtype, self.options.kv_cache_dtype)
        wanted = max(4 * self.max_model_len, 65536)
        return max(min(wanted, CPU_KV_CACHE_BYTES // per_token), self.max_model_len + self.options.block_size)

    # -- requests -------------------------------------------------------------------------
    def default_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams from the checkpoint's defaults, with `overrides` on top."""
        return SamplingParams(**{**self.generation_defaults, **overrides})

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError with a clear message for a request the engine cannot take."""
        self.limits.check(prompt_ids, params)

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
        images: list[ImageInput] | None = None,
    ) -> str:
        """Queues a request; `images` are those already laid out in prompt_ids (see
        herd.engine.prompt_images)."""
        params = params or self.default_params()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_prompt(prompt_ids, params)
        if images and self.runner.vision_model is None:
            raise ValueError("this model has no vision tower: image inputs are not supported")
        room = self.max_model_len - len(prompt_ids)
        max_tokens = min(params.max_tokens or self.generation_defaults.get("max_tokens") or room, room)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        requests: list[Request] = []
        for i in range(params.n):
            child_params = params
            if params.seed is not None and i > 0:
                # Each sample draws its own numbers, still reproducible from the one seed.
                child_params = dataclasses.replace(params, seed=params.seed + i * 1_000_003)
            child = Request(
                sequence_id(request_id, params.n, i),
                list(prompt_ids),
                child_params,
                max_tokens,
                stop_ids,
                # Later samples start once the first has the prompt in the prefix cache.
                wait_for=requests[0] if requests and self.blocks.enable_prefix_caching else None,
                images=list(images or []),
            )
            if params.structured_outputs is not None:
                child.grammar = self.grammars.start(params.structured_outputs)
            requests.append(child)
        group = _Group(request_id, list(prompt_ids), prompt, params, requests)
        self._groups[request_id] = group
        for r in requests:
            self._group_of[r.request_id] = group
            self.scheduler.add(r)
        return request_id

    def abort(self, request_id: str) -> str | None:
        """Stops a request at once and frees everything it held; given one sample's
        sequence_id (n > 1), stops that sample alone. Returns the id of the request that
        ended with it (once its last sample is over), if any."""
        group = self._groups.get(request_id)
        if group is not None:
            targets = group.requests
        else:
            group = self._group_of.get(request_id)
            if group is None:
                return None
            targets = [r for r in group.requests if r.request_id == request_id]
        for r in targets:
            if not r.finished:
                r.finish("abort")
                self.scheduler.finish(r)
        if not group.finished:
            return None
        self._close(group)
        return group.request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def check_alive(self) -> None:
        """Raises if a worker rank of a parallel model has died (nothing to do on one device)."""
        check = getattr(self.runner, "check", None)
        if check is not None:
            check()

    def close(self) -> None:
        """Stops the worker ranks of a parallel model (nothing to do on one device)."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def active_request_ids(self) -> list[str]:
        return list(self._groups)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._groups

    def stats(self) -> EngineStats:
        pools = self.cache.pools.values()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.blocks.usage(),
            kv_blocks_total=sum(p.num_blocks for p in pools),
            kv_blocks_used=sum(p.num_used for p in pools),
            prefix_queries=self.scheduler.prefix_queries,
            prefix_hits=self.scheduler.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # -- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns an output, with its text, for every request that
        made progress (the in-process door; the engine-core process uses step_tokens)."""
        outputs = []
        for group, tokens in self._step():
            if group.text is None:
                group.text = RequestText(group.request_id, group.prompt_ids, group.prompt, group.params, self.tokenizer)
            out, stopped = group.text.add(tokens)
            for i in stopped:  # a stop string ended it: it takes no further step
                r = group.requests[i]
                r.finish("stop", group.text.seqs[i].stop_reason)
                self.scheduler.finish(r)
            if stopped and group.finished:
                self._close(group)
            outputs.append(out)
        return outputs

    def step_tokens(self) -> list[RequestTokens]:
        """Runs one scheduled batch; returns the new tokens of every request that made
        progress, without text (stop strings are the caller's: see RequestText)."""
        return [tokens for _, tokens in self._step()]

    def _step(self) -> list[tuple[_Group, RequestTokens]]:
        failed = self._fail_broken_grammars()
        if failed:
            return failed
        batch = self.scheduler.step()
        if not batch:
            compiling = [r.grammar for r in self.scheduler.waiting if r.grammar is not None and not r.grammar.ready]
            if compiling and not self.scheduler.running:
                compiling[0].wait(0.05)  # nothing else to do: wait a moment for a grammar
                return []
            if self.scheduler.waiting and not self.scheduler.running:
                # Nothing fits even alone: refuse the head of the queue rather than hang.
                group = self._group_of[self.scheduler.waiting[0].request_id]
                return [self._fail(group, "the request does not fit in the KV cache")]
            return []
        sampled = self.runner.execute(batch)
        self.scheduler.after_step(batch)
        progressed: dict[str, tuple[_Group, list[SeqTokens]]] = {}
        for item, result in zip(batch, sampled):
            r = item.request
            if result is None:
                continue
            group = self._group_of[r.request_id]
            self._append(r, result)
            if r.grammar is not None and not r.grammar.accept(result.token_id) and not r.finished:
                r.finish("error", "the sampled token does not follow the grammar")
            if r.finished:
                self.scheduler.finish(r)
            logprobs = [result.top_logprobs] if r.params.logprobs is not None else None
            seq = SeqTokens(group.requests.index(r), [result.token_id], logprobs, r.finish_reason, r.stop_reason)
            progressed.setdefault(group.request_id, (group, []))[1].append(seq)
        outputs = []
        for group, seqs in progressed.values():
            outputs.append((group, group.tokens(seqs)))
            if group.finished:
                self._close(group)
        return outputs

    def _append(self, r: Request, result: Sampled) -> None:
        """A sampled token; the sample ends on a stop token (after min_tokens) or its length."""
        r.output_ids.append(result.token_id)
        if result.token_id in r.stop_ids and len(r.output_ids) > r.params.min_tokens:
            r.finish("stop", result.token_id)
        elif len(r.output_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len:
            r.finish("length")

    def _fail(self, group: _Group, message: str) -> tuple[_Group, RequestTokens]:
        """Ends every sample of a request that has not ended yet, as an error."""
        seqs = []
        for i, r in enumerate(group.requests):
            if not r.finished:
                r.finish("error", message)
                self.scheduler.finish(r)
                seqs.append(SeqTokens(i, [], [] if r.params.logprobs is not None else None, "error", message))
        self._close(group)
        return group, group.tokens(seqs)

    def _fail_broken_grammars(self) -> list[tuple[_Group, RequestTokens]]:
        """Ends the waiting requests whose grammar failed to compile (validation at submission
        catches nearly all such grammars; this is the engine's own safety net)."""
        outputs = []
        for r in list(self.scheduler.waiting):
            group = self._group_of.get(r.request_id)
            if group is not None and r.grammar is not None and r.grammar.ready and r.grammar.error is not None:
                outputs.append(self._fail(group, f"the grammar could not be compiled: {r.grammar.error}"))
        return outputs

    def _close(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for r in group.requests:
            self._group_of.pop(r.request_id, None)


def _load_engine(model, dtype, device, engine_options) -> Engine:
    # quantization="fp8" / "fp8-all": a bf16 checkpoint quantized while loading (FP8 ones need none).
    engine_options = dict(engine_options)
    quantization = engine_options.pop("quantization", None)
    # Where the files come from: a Hub revision and a download directory for Hub ids.
    source = {k: engine_options.pop(k) for k in ("revision", "download_dir") if k in engine_options}
    options = engine_options_from(engine_options)  # a misspelt option fails before anything loads
    model_dir = resolve_model_dir(model, **source)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = load_config(model_dir)
    # Everything that can be checked from the config is, before the weights are read.
    options = resolve_engine_options(options, config)
    check_quantization(config, quantization)
    if config.is_multimodal and config.vision is not None:
        from herd.model.vision import VisionConfig

        VisionConfig.from_model_config(config, model_dir)  # the saved image-processor settings
    torch_dtype = resolve_dtype(dtype, config, device)
    tokenizer = Tokenizer.from_dir(model_dir)
    if options.tensor_parallel_size > 1:
        from herd.parallel.executor import start_parallel

        if device.type == "cpu" and options.cpu_threads is None:
            # --cpu-threads is per rank: this node's ranks share its cores.
            per_node = options.tensor_parallel_size // options.nnodes
            options = dataclasses.replace(options, cpu_threads=max(1, default_cpu_threads() // per_node))

        text_model, vision, executor = start_parallel(model_dir, config, torch_dtype, device, quantization, options)
        try:
            engine = Engine(model_dir, config, tokenizer, text_model, device, torch_dtype, options, executor)
        except BaseException:
            executor.abort()
            raise
        engine.runner.vision_model = vision
        return engine
    text_model = load_text_model(model_dir, config, torch_dtype, device, quantization)
    engine = Engine(model_dir, config, tokenizer, text_model, device, torch_dtype, options)
    if config.is_multimodal and config.vision is not None:
        from herd.model.vision import load_vision_model

        engine.runner.vision_model = load_vision_model(model_dir, config, torch_dtype, device)
    return engine
