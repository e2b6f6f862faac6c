"""What the engine hands back: per-step token outputs, and the results with text built from them.

The engine only samples tokens: each step it reports, per request, what its samples gained
(RequestTokens). Text is made where those tokens arrive, by one class, RequestText, used by both
doors: the in-process Engine.step (herd.llm.LLM) and, under `herd serve`, the API server's
EngineClient, so the engine-core process never detokenizes. RequestText builds each sample's
text incrementally (streaming-safe detokenization), matches stop strings on that text across
token boundaries and, while a sample runs, holds back the tail that could still turn out to be
the start of a stop string. A stop string is found after the engine sampled the token that
completed it; whoever drives the engine then ends that sample there (Engine.step at once, the
API server with an abort), and tokens the engine sampled after it are never shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.engine.sampling import SamplingParams
from herd.tokenizer import IncrementalDetokenizer, Tokenizer


def sequence_id(request_id: str, n: int, index: int) -> str:
    """The engine's id of sample `index` of a request with n samples (what Engine.abort takes
    to stop that sample alone)."""
    return request_id if n == 1 else f"{request_id}#{index}"


@dataclass
class SeqTokens:
    """What one of a request's n samples gained in one engine step."""

    index: int
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # one per token; None when the request asked for none
    finish_reason: str | None  # "stop" (a stop token) | "length" | "abort" | "error"; None while running
    stop_reason: int | str | None = None  # the stop token id, or an error's message


@dataclass
class RequestTokens:
    """One request's step: only the samples that gained a token or ended in it."""

    request_id: str
    seqs: list[SeqTokens]
    finished: bool  # every sample has ended in the engine
    num_cached_tokens: int
    prompt_logprobs: list[dict[int, float] | None] | None = None  # once, with the first output


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


class SequenceText:
    """One sample: its tokens in, its text, finish decision and deltas out."""

    def __init__(self, params: SamplingParams, tokenizer: Tokenizer, index: int):
        self.params = params
        self.index = index
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.stops = [s for s in params.stop if s]
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_chars = 0
        self.sent_tokens = 0
        self.sent_logprobs = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, seq: SeqTokens) -> None:
        if self.finished:
            return  # sampled after a stop string ended this sample: never part of its output
        last = len(seq.token_ids) - 1
        for k, token_id in enumerate(seq.token_ids):
            self.token_ids.append(token_id)
            if self.logprobs is not None and seq.logprobs:
                self.logprobs.append(seq.logprobs[k])
            if k == last and seq.finish_reason == "stop" and seq.stop_reason == token_id:
                break  # a stop token ends the sample; its text is not part of the output
            self.text += self.detok.add(token_id)
            if self._match_stop_string():
                return
        if seq.finish_reason is None:
            return
        if seq.finish_reason in ("stop", "length"):
            self.text += self.detok.flush()
            # The last characters may complete a stop string only now.
            if seq.finish_reason == "length" and self._match_stop_string():
                return
        self.finish_reason, self.stop_reason = seq.finish_reason, seq.stop_reason

    def _match_stop_string(self) -> bool:
        if len(self.token_ids) < self.params.min_tokens:
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
        end = at + len(stop) if self.params.include_stop_str_in_output else at
        self.text = self.text[:end]
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def output(self) -> CompletionOutput:
        """The current state, with deltas since the previous call."""
        visible = len(self.text) if self.finished else max(self.sent_chars, len(self.text) - self.holdback)
        delta_text = self.text[self.sent_chars : visible]
        self.sent_chars = max(self.sent_chars, visible)
        delta_tokens = self.token_ids[self.sent_tokens :]
        self.sent_tokens = len(self.token_ids)
        delta_logprobs = []
        if self.logprobs is not None:
            delta_logprobs = self.logprobs[self.sent_logprobs :]
            self.sent_logprobs = len(self.logprobs)
        return CompletionOutput(
            index=self.index,
            text=self.text[:visible],
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
            delta_logprobs=delta_logprobs,
        )


class RequestText:
    """Adds up one request's token outputs (RequestTokens, or the engine core's RequestDelta,
    which has the same fields) into the RequestOutputs the doors return: cumulative text,
    tokens and logprobs of all n samples, plus what is new since the previous output."""

    def __init__(self, request_id: str, prompt_ids: list[int], prompt: str | None, params: SamplingParams,
                 tokenizer: Tokenizer):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.prompt = prompt
        self.seqs = [SequenceText(params, tokenizer, i) for i in range(params.n)]
        self.prompt_logprobs = None
        self.engine_finished = False

    @property
    def finished(self) -> bool:
        return self.engine_finished or all(s.finished for s in self.seqs)

    def add(self, tokens: RequestTokens) -> tuple[RequestOutput, list[int]]:
        """The output after `tokens`, and the samples a stop string ended here while the engine
        still runs them: the caller stops those in the engine (Engine.abort of their
        sequence_id), or they would go on taking KV blocks and steps for nothing."""
        if tokens.prompt_logprobs is not None:
            self.prompt_logprobs = tokens.prompt_logprobs
        stopped = []
        for seq in tokens.seqs:
            s = self.seqs[seq.index]
            was_finished = s.finished
            s.add(seq)
            if s.finished and not was_finished and seq.finish_reason is None:
                stopped.append(seq.index)
        self.engine_finished = self.engine_finished or tokens.finished
        out = RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_ids,
            outputs=[s.output() for s in self.seqs],
            finished=self.finished,
            prompt=self.prompt,
            num_cached_tokens=tokens.num_cached_tokens,
            prompt_logprobs=self.prompt_logprobs,
        )
        return out, stopped
