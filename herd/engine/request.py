"""The state of one sequence as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from herd.engine.sampling import SamplingParams
from herd.structured.manager import RequestGrammar


@dataclass(eq=False)
class ImageInput:
    """One image of a prompt: its pixel tiles and where its features go."""

    pixel_values: torch.Tensor  # [tiles (global thumbnail included), 3, size, size]
    content_hash: bytes  # names the pixels, for the prefix cache
    patch_positions: list[int]  # prompt positions of its <|patch|> tokens, in order


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
    images: list[ImageInput] = field(default_factory=list)
    # Projected vision features of all images, in patch order; kept only during the prefill.
    image_features: torch.Tensor | None = None
    # prompt_logprobs[i]: {token id -> logprob} for prompt token i given the tokens before it.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # The grammar its output follows (structured outputs); the request starts once it compiled.
    grammar: RequestGrammar | None = None
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
    def last_patch_position(self) -> int:
        return self.images[-1].patch_positions[-1] if self.images else -1

    def block_extra(self, block_size: int):
        """For prefix-cache hashing: the content hashes of images inside each block."""
        if not self.images:
            return None
        by_block: dict[int, bytes] = {}
        for image in self.images:
            for b in sorted({p // block_size for p in image.patch_positions}):
                by_block[b] = by_block.get(b, b"") + image.content_hash
        return lambda i: by_block.get(i, b"")

    @property
    def uses_prefix_cache(self) -> bool:
        # Prompt logprobs need every prompt position computed, so such requests skip lookups.
        return self.params.prompt_logprobs is None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
