"""The step message rank 0 broadcasts: the scheduled batch, reduced to what a Runner reads.

Workers hold no request state: each step carries every scheduled sequence's token ids, block
tables and sampling parameters, so a worker's Runner computes exactly what rank 0's does and
samples the same tokens (seeded rows; unseeded rows differ, and only rank 0's count). Pixels
travel only with the steps that still have image positions to fill.
"""

from __future__ import annotations

from dataclasses import dataclass

from herd.engine.request import Request
from herd.engine.runner import ScheduledSeq


@dataclass
class CacheSpec:
    """Sent once after start-up: the KV cache every rank allocates (its own KV heads, the same
    blocks, since rank 0's scheduler hands out the block ids)."""

    num_blocks: dict[str, int]
    block_size: int
    kv_dtype: str
    max_num_seqs: int = 64  # for the CPU warm-up rank 0 also does (packed weights, expert shapes)
    max_num_batched_tokens: int = 2048


def to_message(batch: list[ScheduledSeq]) -> list[tuple[Request, int]]:
    return [(_wire_request(item.request), item.num_new) for item in batch]


def from_message(message: list[tuple[Request, int]]) -> list[ScheduledSeq]:
    return [ScheduledSeq(r, n) for r, n in message]


def _wire_request(r: Request) -> Request:
    needs_images = bool(r.images) and r.num_computed <= r.last_patch_position
    return Request(
        r.request_id,
        r.prompt_ids,
        r.params,
        r.max_tokens,
        stop_ids=r.stop_ids,
        output_ids=r.output_ids,
        num_computed=r.num_computed,
        block_tables=r.block_tables,
        images=r.images if needs_images else [],
        # Only its length steers the Runner (which prompt positions still need scoring).
        prompt_logprobs=None if r.prompt_logprobs is None else [None] * len(r.prompt_logprobs),
    )
