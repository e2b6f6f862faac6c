"""The engine (requests in, tokens out, one step at a time) and LLM, its offline front door."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from herd.checkpoint import load_text_model
from herd.config import ModelConfig, load_config
from herd.engine.kv_cache import KVBlockManager, KVCache
from herd.engine.request import Request, Status
from herd.engine.runner import Runner
from herd.engine.sampling import SamplingParams
from herd.engine.scheduler import Scheduler
from herd.model.attention import CHUNKED, GLOBAL
from herd.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: token id -> logprob


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0


@dataclass
class EngineOptions:
    kv_cache_tokens: int | None = None  # None: a default sized for the device
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings


def resolve_model_dir(model: str | Path | None) -> Path:
    """None or "demo" -> the demo checkpoint (made once in herd's cache); else a directory."""
    from herd.demo import DEMO_NAME, ensure_demo_model

    if model is None or str(model) == DEMO_NAME:
        return ensure_demo_model()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a checkpoint directory (no config.json)")
    return path


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


def default_max_tokens(model_dir: Path) -> int | None:
    path = model_dir / "generation_config.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text()).get("max_new_tokens")
            return int(value) if value else None
        except (json.JSONDecodeError, ValueError, TypeError):
            return None
    return None


@dataclass
class _Track:
    """Per-request output bookkeeping: incremental text and stop-string matching."""

    request: Request
    detok: IncrementalDetokenizer
    prompt: str | None
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)


class Engine:
    """Owns the model, the KV cache and the scheduler; `step()` advances every request once."""

    def __init__(
        self,
        model_dir: Path,
        config: ModelConfig,
        tokenizer: Tokenizer,
        model,
        device: torch.device,
        dtype: torch.dtype,
        options: EngineOptions,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        text = config.text
        self.max_model_len = options.max_model_len or text.max_position_embeddings
        self.default_max_tokens = default_max_tokens(model_dir)
        bs = options.block_size
        tokens = options.kv_cache_tokens or max(4 * self.max_model_len, 16 * bs)
        global_blocks = -(-tokens // bs)
        chunked_blocks = global_blocks
        if text.attention_chunk_size is not None:
            # A chunked layer holds at most the current chunk plus one step's tokens per sequence.
            per_seq = text.attention_chunk_size // bs + 1
            bound = options.max_num_seqs * (per_seq + 1) + options.max_num_batched_tokens // bs + 1
            chunked_blocks = min(global_blocks, bound)
        self.cache = KVCache(text, {GLOBAL: global_blocks, CHUNKED: chunked_blocks}, bs, dtype, device)
        self.blocks = KVBlockManager(self.cache, text.attention_chunk_size)
        self.scheduler = Scheduler(self.blocks, options.max_num_seqs, options.max_num_batched_tokens)
        self.runner = Runner(model, self.cache, device)
        self.eos_ids = set(tokenizer.eos_token_ids) | set(text.eos_token_id)
        self._tracks: dict[str, _Track] = {}
        self._ids = itertools.count()

    # -- requests -------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, prompt: str | None = None
    ) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.config.text.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.config.text.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len} tokens"
            )
        room = self.max_model_len - len(prompt_ids)
        max_tokens = min(params.max_tokens or self.default_max_tokens or room, room)
        capacity = self.cache.pools[GLOBAL].num_blocks * self.cache.block_size
        if GLOBAL in self.cache.group_names and len(prompt_ids) + 1 > capacity:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the KV cache holds {capacity}")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        request = Request(request_id, list(prompt_ids), params, max_tokens, stop_ids)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        self._tracks[request_id] = _Track(request, detok, prompt)
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: str) -> None:
        track = self._tracks.pop(request_id, None)
        if track is not None and not track.request.finished:
            track.request.finish("abort")
            self.scheduler.finish(track.request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns an output for every request that made progress."""
        batch = self.scheduler.step()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running:
                # Nothing fits even alone: refuse the head of the queue rather than hang.
                r = self.scheduler.waiting.popleft()
                r.finish("error", "the request does not fit in the KV cache")
                return [self._output(self._tracks.pop(r.request_id))]
            return []
        sampled = self.runner.execute(batch)
        outputs = []
        for item, result in zip(batch, sampled):
            r = item.request
            r.num_computed += item.num_new
            if result is None:
                continue
            track = self._tracks[r.request_id]
            self._append(track, result)
            outputs.append(self._output(track))
            if r.finished:
                self.scheduler.finish(r)
                del self._tracks[r.request_id]
        return outputs

    def _append(self, track: _Track, result) -> None:
        r = track.request
        r.output_ids.append(result.token_id)
        if r.params.logprobs is not None:
            track.logprobs.append(result.top_logprobs)
        if result.token_id in r.stop_ids and len(r.output_ids) > r.params.min_tokens - 1:
            track.text += track.detok.flush()
            r.finish("stop", result.token_id)
            return
        track.text += track.detok.add(result.token_id)
        if self._match_stop_string(track):
            return
        if len(r.output_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len:
            track.text += track.detok.flush()
            self._match_stop_string(track)
            if not r.finished:
                r.finish("length")

    def _match_stop_string(self, track: _Track) -> bool:
        r = track.request
        for stop in r.params.stop:
            if not stop:
                continue
            at = track.text.find(stop)
            if at >= 0:
                end = at + len(stop) if r.params.include_stop_str_in_output else at
                track.text = track.text[:end]
                r.finish("stop", stop)
                return True
        return False

    def _output(self, track: _Track) -> RequestOutput:
        r = track.request
        return RequestOutput(
            request_id=r.request_id,
            prompt_token_ids=r.prompt_ids,
            prompt=track.prompt,
            finished=r.finished,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=track.text,
                    token_ids=list(r.output_ids),
                    finish_reason=r.finish_reason,
                    stop_reason=r.stop_reason,
                    logprobs=list(track.logprobs) if r.params.logprobs is not None else None,
                )
            ],
        )


class LLM:
    """Offline generation: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        **engine_options: Any,
    ):
        self.model_dir = resolve_model_dir(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = load_config(self.model_dir)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.dtype = resolve_dtype(dtype, self.config, self.device)
        self.model = load_text_model(self.model_dir, self.config, self.dtype, self.device)
        self.engine = Engine(
            self.model_dir,
            self.config,
            self.tokenizer,
            self.model,
            self.device,
            self.dtype,
            EngineOptions(**engine_options),
        )

    def generate(
        self, prompts: str | list[int] | list[str | list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """One result per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                prompt_ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_token_id is not None)
                ids.append(self.engine.add_request(prompt_ids, params, prompt=prompt))
            else:
                ids.append(self.engine.add_request(list(prompt), params))
        return self._run(ids)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | None = None,
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """One result per conversation; a single conversation is a list of message dicts."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = []
        for conversation in conversations:
            prompt_ids = self.tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                template=chat_template,
                **(chat_template_kwargs or {}),
            )
            ids.append(self.engine.add_request(prompt_ids, params or SamplingParams()))
        return self._run(ids)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(request_ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                if not self.engine.has_unfinished() and len(final) < len(request_ids):
                    raise RuntimeError("the engine stopped with requests unfinished")
        except BaseException:
            for rid in request_ids:
                self.engine.abort(rid)
            raise
        return [final[rid] for rid in request_ids]
