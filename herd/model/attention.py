"""Attention over a paged KV cache, for one flat batch of sequences.

The batch holds the new tokens of every scheduled sequence back to back. Each KV *group*
(global layers, chunked-local layers) has its own block tables: a sequence's K/V for token
position p lives at slot `block_table[p // block_size] * block_size + p % block_size` of the
layer's cache tensors. Chunked layers only ever read the current chunk, so blocks of chunks a
sequence has left behind may be released (their table entries are then -1 and never read).

This is the portable backend (CPU and any GPU): it gathers each sequence's K/V and calls
PyTorch's scaled_dot_product_attention with an explicit mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GLOBAL = "global"
CHUNKED = "chunked"


@dataclass
class SeqSlice:
    """One sequence's place in the flat batch."""

    start: int  # first row of its new tokens in the batch
    end: int  # one past the last row
    context_len: int  # tokens of this sequence in the cache once this step has run


@dataclass
class GroupTables:
    """Where K/V of one KV group is written and read for this batch."""

    slot_mapping: torch.Tensor  # [T] long: cache slot of each new token
    block_tables: list[torch.Tensor]  # per sequence, [n_blocks] long block ids (-1: released)


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] long
    seqs: list[SeqSlice]
    groups: dict[str, GroupTables]
    block_size: int


@dataclass
class LayerKV:
    """The cache tensors of one layer: [num_slots, kv_heads, head_dim] each."""

    k: torch.Tensor
    v: torch.Tensor
    group: str


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: LayerKV,
    meta: AttentionMetadata,
    scale: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """q [T, Hq, D], k_new/v_new [T, Hkv, D] -> attention output [T, Hq, D].

    chunk_size: None for global (causal) attention, else tokens attend only within their chunk.
    """
    tables = meta.groups[cache.group]
    cache.k[tables.slot_mapping] = k_new.to(cache.k.dtype)
    cache.v[tables.slot_mapping] = v_new.to(cache.v.dtype)

    out = torch.empty_like(q)
    bs = meta.block_size
    for i, seq in enumerate(meta.seqs):
        q_pos = meta.positions[seq.start : seq.end]
        first = int(q_pos[0])
        lo = 0 if chunk_size is None else (first // chunk_size) * chunk_size
        k_pos = torch.arange(lo, seq.context_len, device=q.device)
        table = tables.block_tables[i]
        slots = table[k_pos // bs] * bs + k_pos % bs
        k = cache.k[slots].to(q.dtype)
        v = cache.v[slots].to(q.dtype)
        mask = k_pos[None, :] <= q_pos[:, None]
        if chunk_size is not None:
            mask &= (k_pos[None, :] // chunk_size) == (q_pos[:, None] // chunk_size)
        o = F.scaled_dot_product_attention(
            q[seq.start : seq.end].transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[seq.start : seq.end] = o.squeeze(0).transpose(0, 1)
    return out
