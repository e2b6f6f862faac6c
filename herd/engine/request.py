"""The state of one sequence as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from herd.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: set[int] = field(default_factory=set)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    block_tables: dict[str, list[int]] = field(default_factory=dict)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    num_registered_blocks: int = 0  # leading full blocks already entered in the prefix cache
    # A sibling whose prompt must be in the cache before this one starts (n > 1 shares it).
    wait_for: Request | None = None
    admitted_once: bool = False
    # prompt_logprobs[i]: {token id -> logprob} for prompt token i given the tokens before it.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def uses_prefix_cache(self) -> bool:
        # Prompt logprobs need every prompt position computed, so such requests skip lookups.
        return self.params.prompt_logprobs is None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
