"""What the engine hands back: results with cumulative state and per-step deltas.

The text of a request is built incrementally (streaming-safe detokenization); stop strings are
matched on that text across token boundaries, and while a request runs, the tail that could
still turn out to be the start of a stop string is held back from the deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.engine.request import Request
from herd.engine.sampling import Sampled
from herd.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str  # everything so far
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: token id -> logprob
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, float]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class OutputTracker:
    """Turns one sequence's sampled tokens into text, finish decisions and deltas."""

    def __init__(self, request: Request, tokenizer: Tokenizer, index: int, max_model_len: int):
        self.request = request
        self.index = index
        self.max_model_len = max_model_len
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=request.params.skip_special_tokens)
        self.text = ""
        self.logprobs: list[dict[int, float]] = []
        stops = [s for s in request.params.stop if s]
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent_chars = 0
        self.sent_tokens = 0
        self.sent_logprobs = 0

    def append(self, result: Sampled) -> None:
        r = self.request
        r.output_ids.append(result.token_id)
        if r.params.logprobs is not None:
            self.logprobs.append(result.top_logprobs)
        if result.token_id in r.stop_ids and len(r.output_ids) > r.params.min_tokens:
            self.text += self.detok.flush()
            r.finish("stop", result.token_id)
            return
        self.text += self.detok.add(result.token_id)
        if self._match_stop_string():
            return
        if len(r.output_ids) >= r.max_tokens or r.num_tokens >= self.max_model_len:
            self.text += self.detok.flush()
            if not self._match_stop_string():
                r.finish("length")

    def _match_stop_string(self) -> bool:
        r = self.request
        if len(r.output_ids) < r.params.min_tokens:
            return False
        # Only the new tail can hold a new match: search from where one could begin.
        search_from = max(0, self.sent_chars - self.holdback - 1)
        best = None
        for stop in self.stops:
            at = self.text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        at, stop = best
        end = at + len(stop) if r.params.include_stop_str_in_output else at
        self.text = self.text[:end]
        r.finish("stop", stop)
        return True

    def output(self) -> CompletionOutput:
        """The current state, with deltas since the previous call."""
        r = self.request
        visible = len(self.text) if r.finished else max(self.sent_chars, len(self.text) - self.holdback)
        delta_text = self.text[self.sent_chars : visible]
        self.sent_chars = max(self.sent_chars, visible)
        delta_tokens = r.output_ids[self.sent_tokens :]
        self.sent_tokens = len(r.output_ids)
        delta_logprobs = self.logprobs[self.sent_logprobs :]
        self.sent_logprobs = len(self.logprobs)
        return CompletionOutput(
            index=self.index,
            text=self.text[:visible],
            token_ids=list(r.output_ids),
            finish_reason=r.finish_reason,
            stop_reason=r.stop_reason,
            logprobs=list(self.logprobs) if r.params.logprobs is not None else None,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
            delta_logprobs=delta_logprobs,
        )
