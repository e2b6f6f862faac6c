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


class KVBlockManager:
    """Keeps each sequence's block tables (one per KV group) sized to what it needs next."""

    def __init__(self, cache: KVCache, chunk_size: int | None):
        self.cache = cache
        self.block_size = cache.block_size
        self.chunk_size = chunk_size
        self.pools = cache.pools
        self.group_names = sorted(cache.group_names)

    def blocks_needed(self, tables: dict[str, list[int]], num_tokens: int, first_new_pos: int) -> dict[str, int]:
        """New blocks each group must allocate so the cache covers positions [0, num_tokens)."""
        total = -(-num_tokens // self.block_size)
        needed = {}
        for g in self.group_names:
            have = len(tables.get(g, []))
            needed[g] = max(0, total - have)
        if CHUNKED in needed and self.chunk_size is not None:
            # Blocks before the current chunk are released first and need no new allocation.
            first_block = (first_new_pos // self.chunk_size) * self.chunk_size // self.block_size
            needed[CHUNKED] = max(0, total - max(first_block, len(tables.get(CHUNKED, []))))
        return needed

    def can_allocate(self, tables: dict[str, list[int]], num_tokens: int, first_new_pos: int) -> bool:
        needed = self.blocks_needed(tables, num_tokens, first_new_pos)
        return all(self.pools[g].num_free >= n for g, n in needed.items())

    def allocate(self, tables: dict[str, list[int]], num_tokens: int, first_new_pos: int) -> None:
        """Grows the tables to cover [0, num_tokens); releases chunked blocks left behind."""
        self.release_old_chunks(tables, first_new_pos)
        total = -(-num_tokens // self.block_size)
        for g in self.group_names:
            table = tables.setdefault(g, [])
            missing = total - len(table)
            if missing <= 0:
                continue
            if g == CHUNKED and self.chunk_size is not None:
                # Positions before the current chunk are never read again: no block for them.
                first_block = (first_new_pos // self.chunk_size) * self.chunk_size // self.block_size
                while len(table) < min(first_block, total):
                    table.append(-1)
                missing = total - len(table)
            table.extend(self.pools[g].allocate(missing))

    def release_old_chunks(self, tables: dict[str, list[int]], first_new_pos: int) -> None:
        table = tables.get(CHUNKED)
        if not table or self.chunk_size is None:
            return
        first_block = (first_new_pos // self.chunk_size) * self.chunk_size // self.block_size
        old = [b for b in table[:first_block] if b >= 0]
        if old:
            self.pools[CHUNKED].free(old)
            table[:first_block] = [-1] * min(first_block, len(table))

    def free(self, tables: dict[str, list[int]]) -> None:
        for g, table in tables.items():
            self.pools[g].free(table)
            table.clear()

    def num_free(self) -> dict[str, int]:
        return {g: self.pools[g].num_free for g in self.group_names}
