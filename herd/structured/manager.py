"""Engine side of structured outputs: grammars compile in a thread pool (cached by their text),
each request follows its grammar with its own matcher, and one bitmask per step masks the
logits of every constrained row before sampling.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from herd.structured.spec import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept, least recently used first out


class RequestGrammar:
    """One sequence's grammar: waits for its compile, then tracks the tokens it produced."""

    def __init__(self, spec: StructuredOutputsParams, compiled: Future):
        self.spec = spec
        self._compiled = compiled
        self.matcher = None
        self.error: str | None = None

    @property
    def ready(self) -> bool:
        """True once the grammar compiled (or failed: see `error`); the request may start then."""
        if self.matcher is None and self.error is None and self._compiled.done():
            try:
                self.matcher = self._compiled.result().deep_copy()  # a fresh matcher of its own
            except Exception as e:  # noqa: BLE001 - any failure is this request's error
                self.error = str(e)
        return self.matcher is not None or self.error is not None

    def wait(self, timeout: float) -> None:
        concurrent.futures.wait([self._compiled], timeout=timeout)

    def accept(self, token_id: int) -> bool:
        """Advances the matcher by a sampled token; False when the grammar rejects it."""
        return self.matcher.consume_token(token_id)


class GrammarManager:
    """One per engine: the prepared vocabulary, the compile pool and cache, the step's masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids, workers: int = 1):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="herd-grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._prepared = None
        self._executor = None
        self._bitmask = torch.empty(0, dtype=torch.int32)

    def prepared(self):
        from herd.structured.backend import prepare_tokenizer

        if self._prepared is None:
            self._prepared = prepare_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._prepared

    def warm_up(self) -> Future:
        """Prepares the vocabulary in the background, so the first request does not wait for it."""
        return self._pool.submit(self.prepared)

    def start(self, spec: StructuredOutputsParams) -> RequestGrammar:
        """The request's grammar; compiling (off the engine loop) unless a cached one is ready."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._pool.submit(self._compile, spec)
                self._cache[key] = future
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return RequestGrammar(spec, future)

    def _compile(self, spec: StructuredOutputsParams):
        import llguidance

        from herd.structured.grammars import grammar_text

        matcher = llguidance.LLMatcher(self.prepared().tokenizer, grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, RequestGrammar]]) -> None:
        """Masks, in place, the logits row of each (row index, grammar): tokens the grammar does
        not allow next get -inf (end-of-turn only once the grammar is complete)."""
        if not rows:
            return
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=max(1, min(4, torch.get_num_threads())))
        words = (self.vocab_size + 31) // 32
        if self._bitmask.shape[0] < len(rows):
            self._bitmask = torch.empty(max(len(rows), 2 * self._bitmask.shape[0]), words, dtype=torch.int32)
        bitmask = self._bitmask[: len(rows)]
        self._executor.unsafe_compute_mask_ptr(
            [(g.matcher, j) for j, (_, g) in enumerate(rows)], bitmask.data_ptr(), words * 4, len(rows)
        )
        # Unpacked by numpy (one byte per token, bit order = token order), then one in-place
        # fill per row: several times cheaper than shifting int32 words in torch.
        vocab = logits.shape[-1]
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
        blocked = torch.from_numpy(bits.view(np.bool_)).logical_not_().to(logits.device)
        control = self.prepared().control_token_ids.to(logits.device)
        for j, (i, g) in enumerate(rows):
            logits[i].masked_fill_(blocked[j], float("-inf"))
            if g.spec.is_json:
                logits[i, control] = float("-inf")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
