"""The paged KV cache: cache tensors per layer, block pools per KV group, prefix caching.

Llama 4 has two kinds of attention layers, and so two KV groups with separate block pools:
global (NoPE) layers keep K/V for the whole context, chunked-local (RoPE) layers only need the
current chunk of `attention_chunk_size` tokens. Keeping the groups apart means a chunked
layer's blocks can be handed back as soon as a sequence crosses a chunk boundary.

Prefix caching: a full block is named by a hash chained over all tokens up to its end. Blocks
are reference counted; a block nobody uses goes to the back of its pool's free queue but keeps
its hash, so a later request with the same prefix can take it back until it is reused (least
recently freed blocks are reused first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from herd.config import TextConfig
from herd.model.attention import CHUNKED, GLOBAL, LayerKV

Tables = dict[str, list[int]]  # KV group -> block ids by position (-1: released, never read)


def layer_groups(cfg: TextConfig) -> list[str]:
    return [CHUNKED if cfg.is_chunked(i) else GLOBAL for i in range(cfg.num_hidden_layers)]


def chain_hashes(
    token_ids: list[int], block_size: int, start: list[bytes] | None = None, extra=None
) -> list[bytes]:
    """Hashes of every full block of token_ids, each chained over all the blocks before it.

    `start` holds hashes already computed for the first blocks; they are extended, not redone.
    `extra(i)`, when given, adds bytes to block i's hash: the content of images whose features
    replace its tokens (the token ids alone, all <|patch|>, do not tell two images apart).
    A cryptographic hash keeps one tenant's prompt from colliding with another's cache entry.
    """
    hashes = list(start or [])
    for i in range(len(hashes), len(token_ids) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        h = hashlib.sha256(hashes[-1] if hashes else b"herd-prefix")
        h.update(b"".join(t.to_bytes(4, "little") for t in block))
        if extra is not None:
            h.update(extra(i))
        hashes.append(h.digest())
    return hashes


class BlockPool:
    """The blocks of one KV group: reference counts, an LRU free queue, and a hash index."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        # Front: reused first. A freed block joins at the back, its cached content intact.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise MemoryError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        taken = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            self._forget(block)
            self.ref_count[block] = 1
            taken.append(block)
        return taken

    def free(self, blocks: list[int]) -> None:
        # The tail of a sequence is the least likely to be shared: queue it to be reused first.
        for block in reversed(blocks):
            if block < 0:
                continue
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_queue[block] = None

    def take_cached(self, block_hash: bytes) -> int | None:
        """A block holding this prefix, now referenced once more; None on a miss."""
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        if self.ref_count[block] == 0:
            del self.free_queue[block]
        self.ref_count[block] += 1
        return block

    def is_cached(self, block_hash: bytes) -> bool:
        return block_hash in self.by_hash

    def register(self, block: int, block_hash: bytes) -> None:
        if self.hash_of[block] is None and block_hash not in self.by_hash:
            self.hash_of[block] = block_hash
            self.by_hash[block_hash] = block

    def _forget(self, block: int) -> None:
        old = self.hash_of[block]
        if old is not None:
            self.hash_of[block] = None
            if self.by_hash.get(old) == block:
                del self.by_hash[old]


class KVCache:
    """K/V tensors for every layer, shaped [num_blocks * block_size, kv_heads, head_dim].

    kv_dtype "auto" stores K/V in the model's dtype; "fp8" stores them in E4M3 with a float32
    scale per token and head (about half the bytes per token: (head_dim + 4) / (2 * head_dim)).
    """

    KV_DTYPES = ("auto", "fp8")

    def __init__(
        self,
        cfg: TextConfig,
        num_blocks: dict[str, int],
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        kv_dtype: str = "auto",
    ):
        if cfg.attention_chunk_size is not None and cfg.attention_chunk_size % block_size:
            raise ValueError(
                f"block_size {block_size} must divide attention_chunk_size {cfg.attention_chunk_size}"
            )
        if kv_dtype not in self.KV_DTYPES:
            raise ValueError(f"unsupported kv_cache_dtype {kv_dtype!r}: use one of {self.KV_DTYPES}")
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        self.groups = layer_groups(cfg)
        self.group_names = sorted(set(self.groups))
        self.pools = {g: BlockPool(num_blocks[g]) for g in self.group_names}
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        fp8 = kv_dtype == "fp8"
        store = torch.float8_e4m3fn if fp8 else dtype

        def scales(g):
            return torch.zeros(num_blocks[g] * block_size, shape[0], device=device) if fp8 else None

        self.layers = [
            LayerKV(
                k=torch.zeros(num_blocks[g] * block_size, *shape, dtype=store, device=device),
                v=torch.zeros(num_blocks[g] * block_size, *shape, dtype=store, device=device),
                group=g,
                k_scale=scales(g),
                v_scale=scales(g),
            )
            for g in self.groups
        ]

    @staticmethod
    def bytes_per_token(cfg: TextConfig, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        """K and V of one token over all layers (before chunked-window savings)."""
        per_head = cfg.head_dim + 4 if kv_dtype == "fp8" else cfg.head_dim * dtype.itemsize
        return cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * per_head

    def nbytes(self) -> int:
        tensors = [t for layer in self.layers for t in (layer.k, layer.v, layer.k_scale, layer.v_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class KVBlockManager:
    """Keeps each sequence's block tables sized to what it needs next, sharing cached prefixes."""

    def __init__(self, cache: KVCache, chunk_size: int | None, enable_prefix_caching: bool = True):
        self.block_size = cache.block_size
        self.chunk_size = chunk_size
        self.pools = cache.pools
        self.group_names = cache.group_names
        self.enable_prefix_caching = enable_prefix_caching

    def _first_live_block(self, group: str, position: int) -> int:
        """The first block a sequence still reads when its next token is at `position`."""
        if group != CHUNKED or self.chunk_size is None:
            return 0
        return (position // self.chunk_size) * self.chunk_size // self.block_size

    # -- allocation ------------------------------------------------------------------------
    def blocks_needed(self, tables: Tables, num_tokens: int, first_new_pos: int) -> dict[str, int]:
        """New blocks each group must allocate so the cache covers positions [0, num_tokens)."""
        total = -(-num_tokens // self.block_size)
        return {
            g: max(0, total - max(self._first_live_block(g, first_new_pos), len(tables.get(g, []))))
            for g in self.group_names
        }

    def can_allocate(self, tables: Tables, num_tokens: int, first_new_pos: int) -> bool:
        needed = self.blocks_needed(tables, num_tokens, first_new_pos)
        return all(self._free_after_release(g, tables, first_new_pos) >= n for g, n in needed.items())

    def _free_after_release(self, group: str, tables: Tables, first_new_pos: int) -> int:
        """Free blocks once `allocate` has released the chunks this sequence has left behind."""
        pool = self.pools[group]
        table = tables.get(group, [])
        first_live = min(self._first_live_block(group, first_new_pos), len(table))
        return pool.num_free + sum(1 for b in table[:first_live] if b >= 0 and pool.ref_count[b] == 1)

    def allocate(self, tables: Tables, num_tokens: int, first_new_pos: int) -> None:
        """Grows the tables to cover [0, num_tokens); releases chunked blocks left behind."""
        self.release_old_chunks(tables, first_new_pos)
        total = -(-num_tokens // self.block_size)
        for g in self.group_names:
            table = tables.setdefault(g, [])
            # Positions before the current chunk are never read again: no block for them.
            first_live = min(self._first_live_block(g, first_new_pos), total)
            if len(table) < first_live:
                table.extend([-1] * (first_live - len(table)))
            if len(table) < total:
                table.extend(self.pools[g].allocate(total - len(table)))

    def release_old_chunks(self, tables: Tables, first_new_pos: int) -> None:
        table = tables.get(CHUNKED)
        if not table:
            return
        first_live = min(self._first_live_block(CHUNKED, first_new_pos), len(table))
        old = [b for b in table[:first_live] if b >= 0]
        if old:
            self.pools[CHUNKED].free(old)
            table[:first_live] = [-1] * first_live

    def free(self, tables: Tables) -> None:
        for g, table in tables.items():
            self.pools[g].free(table)
            table.clear()

    def num_free(self) -> dict[str, int]:
        return {g: self.pools[g].num_free for g in self.group_names}

    def usage(self) -> float:
        """Fraction of blocks in use, over all groups."""
        total = sum(p.num_blocks for p in self.pools.values())
        return sum(p.num_used for p in self.pools.values()) / max(total, 1)

    # -- prefix caching --------------------------------------------------------------------
    def cached_prefix(self, prompt_ids: list[int], hashes: list[bytes], tables: Tables) -> int:
        """Takes the cached blocks of the longest reusable prefix into `tables` (empty before);
        returns how many tokens they cover (a multiple of block_size, less than the prompt)."""
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        # At least the last prompt token must be computed: its logits give the first token.
        usable = min(len(hashes), (len(prompt_ids) - 1) // bs)
        hits = {}
        for g in self.group_names:
            n = 0
            while n < usable and self.pools[g].is_cached(hashes[n]):
                n += 1
            hits[g] = n
        # Global layers need every block of the prefix; chunked layers only those of the chunk
        # the next token falls in, so their hit may stop short of the beginning.
        num_blocks = hits.get(GLOBAL, usable)
        while num_blocks > 0 and CHUNKED in hits:
            first_live = self._first_live_block(CHUNKED, num_blocks * bs)
            if all(self.pools[CHUNKED].is_cached(h) for h in hashes[first_live:num_blocks]):
                break
            num_blocks -= 1
        for g in self.group_names:
            first_live = self._first_live_block(g, num_blocks * bs)
            tables[g] = [-1] * first_live + [self.pools[g].take_cached(h) for h in hashes[first_live:num_blocks]]
        return num_blocks * bs

    def register_full_blocks(self, tables: Tables, hashes: list[bytes], start: int) -> None:
        """Names blocks [start, len(hashes)) by their hashes so later requests can find them."""
        if not self.enable_prefix_caching:
            return
        for g, table in tables.items():
            for i in range(start, min(len(hashes), len(table))):
                if table[i] >= 0:
                    self.pools[g].register(table[i], hashes[i])
