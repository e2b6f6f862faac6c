"""The paged KV cache: cache tensors per layer, and a pool of blocks per KV group.

Llama 4 has two kinds of attention layers, and so two KV groups with separate block pools:
global (NoPE) layers keep K/V for the whole context, chunked-local (RoPE) layers only need the
current chunk of `attention_chunk_size` tokens. Keeping the groups apart means a chunked
layer's blocks can be handed back as soon as a sequence crosses a chunk boundary.
"""

from __future__ import annotations

import torch

from herd.config import TextConfig
from herd.model.attention import CHUNKED, GLOBAL, LayerKV


def layer_groups(cfg: TextConfig) -> list[str]:
    return [CHUNKED if cfg.is_chunked(i) else GLOBAL for i in range(cfg.num_hidden_layers)]


class BlockPool:
    """Hands out block ids of one KV group; a freed block goes back to the end of the line."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(b for b in blocks if b >= 0)


class KVCache:
    """K/V tensors for every layer, shaped [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        cfg: TextConfig,
        num_blocks: dict[str, int],
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if cfg.attention_chunk_size is not None and cfg.attention_chunk_size % block_size:
            raise ValueError(
                f"block_size {block_size} must divide attention_chunk_size {cfg.attention_chunk_size}"
            )
        self.block_size = block_size
        self.groups = layer_groups(cfg)
        self.pools = {g: BlockPool(num_blocks.get(g, 0)) for g in (GLOBAL, CHUNKED)}
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        self.layers = [
            LayerKV(
                k=torch.zeros(num_blocks[g] * block_size, *shape, dtype=dtype, device=device),
                v=torch.zeros(num_blocks[g] * block_size, *shape, dtype=dtype, device=device),
                group=g,
            )
            for g in self.groups
        ]

    @property
    def group_names(self) -> set[str]:
        return set(self.groups)
