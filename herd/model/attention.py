"""Attention over a paged KV cache, for one flat batch of sequences.

The batch holds the new tokens of every scheduled sequence back to back. Each KV *group*
(global layers, chunked-local layers) has its own block tables: a sequence's K/V for token
position p lives at slot `block_table[p // block_size] * block_size + p % block_size` of the
layer's cache tensors. Chunked layers only ever read the current chunk, so blocks of chunks a
sequence has left behind may be released (their table entries are then -1 and never read).

This is the portable backend (CPU and any GPU): it gathers K/V through the block tables and
calls PyTorch's scaled_dot_product_attention with an explicit mask. Decoding sequences (one
new token each) share one padded, batched computation per layer (`decode_attention`: two
batched matmuls); prefills run one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from herd.model.quant import quantize_per_token

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
class DecodePlan:
    """Where the decoding sequences' K/V lie, padded to one length; shared by a group's layers."""

    rows: torch.Tensor  # [B] long: the batch row of each decoding sequence's token
    slots: torch.Tensor  # [B, L] long: cache slots of the keys each one reads (0 where padded)
    valid: torch.Tensor  # [B, L] bool: which of those are real keys
    others: list[int]  # indices (into seqs) of the sequences that are not decoding
    all_rows: bool = False  # every row of the batch is a decoding sequence's, in order
    _head_major: dict = field(default_factory=dict)

    def head_major_index(self, kv_heads: int) -> torch.Tensor:
        """[B * Hkv * L] rows of a cache viewed as [slots * Hkv, D]: one index_select then gives
        K or V as [B, Hkv, L, D], the layout the batched products read without a copy."""
        if kv_heads not in self._head_major:
            heads = torch.arange(kv_heads, device=self.slots.device)
            self._head_major[kv_heads] = (self.slots[:, None, :] * kv_heads + heads[None, :, None]).reshape(-1)
        return self._head_major[kv_heads]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] long
    seqs: list[SeqSlice]
    groups: dict[str, GroupTables]
    block_size: int
    # Built on first use by the first layer of each (group, chunking), reused by the others.
    decode_plans: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)  # other per-step values the layers share

    def decode_plan(self, group: str, chunk_size: int | None) -> DecodePlan:
        key = (group, chunk_size)
        if key not in self.decode_plans:
            self.decode_plans[key] = self._make_decode_plan(group, chunk_size)
        return self.decode_plans[key]

    def _make_decode_plan(self, group: str, chunk_size: int | None) -> DecodePlan:
        device = self.positions.device
        decoding = [i for i, s in enumerate(self.seqs) if s.end - s.start == 1]
        others = [i for i, s in enumerate(self.seqs) if s.end - s.start != 1]
        if not decoding:
            empty = torch.zeros(0, 0, dtype=torch.long, device=device)
            return DecodePlan(torch.zeros(0, dtype=torch.long, device=device), empty, empty.bool(), others)
        bs = self.block_size
        lengths = [self.seqs[i].context_len for i in decoding]
        # The token at position n - 1 reads [lo, n): all of it, or its own chunk.
        starts = [0 if chunk_size is None else ((n - 1) // chunk_size) * chunk_size for n in lengths]
        width = max(n - lo for n, lo in zip(lengths, starts))
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)[None, :]
        valid = positions < torch.tensor(lengths, device=device)[:, None]
        tables = torch.nn.utils.rnn.pad_sequence(
            [self.groups[group].block_tables[i] for i in decoding], batch_first=True, padding_value=0
        )
        block_index = torch.where(valid, positions // bs, 0)
        blocks = tables.gather(1, block_index).clamp(min=0)
        slots = torch.where(valid, blocks * bs + positions % bs, 0)
        rows = torch.tensor([self.seqs[i].start for i in decoding], device=device)
        all_rows = not others and len(decoding) == self.positions.shape[0]
        return DecodePlan(rows, slots, valid, others, all_rows)


@dataclass
class LayerKV:
    """The cache tensors of one layer: [num_slots, kv_heads, head_dim] each.

    An FP8 cache holds K and V in E4M3 with one float32 scale per token and head
    (k_scale, v_scale: [num_slots, kv_heads]); otherwise the scales are None.
    """

    k: torch.Tensor
    v: torch.Tensor
    group: str
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def _store(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, x: torch.Tensor) -> None:
    if scales is None:
        cache[slots] = x.to(cache.dtype)
        return
    # Per token and head: scale = amax over head_dim / 448, as for FP8 activations.
    q, s = quantize_per_token(x.reshape(-1, x.shape[-1]))
    cache[slots] = q.view(x.shape)
    scales[slots] = s.view(x.shape[:-1])


def _load_heads(cache: torch.Tensor, scales: torch.Tensor | None, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the cache viewed as [slots * Hkv, D] (see DecodePlan.head_major_index)."""
    flat = cache.view(-1, cache.shape[-1])
    if scales is None:
        return flat.index_select(0, index).to(dtype)
    return flat.index_select(0, index).to(dtype) * scales.view(-1).index_select(0, index)[:, None].to(dtype)


def _load(cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # index_select, not cache[slots]: on CPU the advanced-indexing gather of these small rows
    # costs about 8x more (measured 206 vs 27 us for 4K slots of [2, 32] bf16).
    if scales is None:
        return cache.index_select(0, slots).to(dtype)
    return cache.index_select(0, slots).to(dtype) * scales.index_select(0, slots)[..., None].to(dtype)


# Above this many attention scores (decoding sequences x query heads x keys) decode attention
# goes through SDPA's blocked kernels instead of materializing the scores (64 MiB of float32).
DECODE_SCORES_LIMIT = 16 * 2**20


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D], k/v [B, Hkv, L, D], valid [B, L] -> [B, Hq, D].

    Two small batched matmuls with the query heads of each KV head side by side, in the model's
    dtype (as transformers' eager attention: bf16 products, float32 softmax); the float32 copies
    of K and V that a float32 product would need cost more than the products themselves here.
    On CPU, SDPA's flash kernel with a mask costs 2-7x more at these shapes (it is built for many
    query rows; bf16 worst).
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    if b * hq * k.shape[2] > DECODE_SCORES_LIMIT:
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
        )
        return o.squeeze(2)
    # Query head h reads KV head h // (hq / hkv), as SDPA's enable_gqa does.
    qg = q.view(b, hkv, hq // hkv, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, L]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, hq, d)  # [B, Hkv, G, D] -> [B, Hq, D]


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
    _store(cache.k, cache.k_scale, tables.slot_mapping, k_new)
    _store(cache.v, cache.v_scale, tables.slot_mapping, v_new)

    plan = meta.decode_plan(cache.group, chunk_size)
    if len(plan.rows):
        b, width = plan.slots.shape
        hkv, d = cache.k.shape[1:]
        index = plan.head_major_index(hkv)
        k = _load_heads(cache.k, cache.k_scale, index, q.dtype).view(b, hkv, width, d)
        v = _load_heads(cache.v, cache.v_scale, index, q.dtype).view(b, hkv, width, d)
        if plan.all_rows:  # a pure decode step: nothing to scatter
            return decode_attention(q, k, v, plan.valid, scale)
        out = torch.empty_like(q)
        out[plan.rows] = decode_attention(q[plan.rows], k, v, plan.valid, scale)
    else:
        out = torch.empty_like(q)
    bs = meta.block_size
    for i in plan.others:
        seq = meta.seqs[i]
        # New tokens are the last of the context, so the first one's position is known on the host.
        first = seq.context_len - (seq.end - seq.start)
        if cache.k_scale is None and first % (chunk_size or seq.context_len) == 0:
            # Nothing before the new tokens in their window (a fresh prompt; a chunk boundary):
            # each window attends causally to its own new K/V, no gather and no mask to build.
            _causal_windows(q, k_new, v_new, out, seq.start, seq.end, chunk_size, scale)
            continue
        q_pos = meta.positions[seq.start : seq.end]
        lo = 0 if chunk_size is None else (first // chunk_size) * chunk_size
        k_pos = torch.arange(lo, seq.context_len, device=q.device)
        table = tables.block_tables[i]
        slots = table[k_pos // bs] * bs + k_pos % bs
        k = _load(cache.k, cache.k_scale, slots, q.dtype)
        v = _load(cache.v, cache.v_scale, slots, q.dtype)
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


def _causal_windows(q, k, v, out, start: int, end: int, chunk_size: int | None, scale: float) -> None:
    """Causal attention of rows [start, end) among themselves, cut into windows of chunk_size
    rows (the first row begins a window), written to out."""
    step = end - start if chunk_size is None else chunk_size
    for a in range(start, end, step):
        b = min(end, a + step)
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1).unsqueeze(0),
            k[a:b].transpose(0, 1).unsqueeze(0),
            v[a:b].transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        out[a:b] = o.squeeze(0).transpose(0, 1)
