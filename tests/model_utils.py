"""Runs herd's model over one sequence outside the engine, for logit comparisons."""

from __future__ import annotations

import torch

from herd.engine.kv_cache import KVCache
from herd.model.attention import CHUNKED, GLOBAL, AttentionMetadata, GroupTables, SeqSlice


@torch.inference_mode()
def herd_logits(model, token_ids: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits at every position of one prompt, from a fresh cache laid out contiguously."""
    n = len(token_ids)
    blocks = -(-n // block_size)
    cache = KVCache(model.config, {GLOBAL: blocks, CHUNKED: blocks}, block_size, model.embed_tokens.weight.dtype)
    table = torch.arange(blocks)
    meta = AttentionMetadata(
        positions=torch.arange(n),
        seqs=[SeqSlice(0, n, n)],
        groups={g: GroupTables(torch.arange(n), [table]) for g in (GLOBAL, CHUNKED)},
        block_size=block_size,
    )
    hidden = model(torch.tensor(token_ids), meta, cache.layers)
    return model.compute_logits(hidden)
