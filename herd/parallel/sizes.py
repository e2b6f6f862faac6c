"""What one rank holds: head, KV-head, expert and vocabulary ranges for a parallel size.

Tensor parallelism splits attention by heads, MLPs by their intermediate dimension and the
vocabulary by rows; expert parallelism (on top of it) gives each rank whole routed experts
instead of a slice of every expert. Everything here is plain arithmetic on the config, shared
by the model builder, the loader (which rows of a checkpoint tensor a rank reads) and `herd plan`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from herd.config import TextConfig


class ParallelConfigError(ValueError):
    """A parallel size the model's shapes do not allow."""


def divides_shapes(cfg: TextConfig, size: int, expert_parallel: bool) -> list[str]:
    """Why `size` ranks cannot share this model (empty: they can)."""
    why = []
    if cfg.num_attention_heads % size:
        why.append(f"{cfg.num_attention_heads} attention heads")
    kv = cfg.num_key_value_heads
    if kv % size and size % kv:
        why.append(f"{kv} KV heads (a size must divide them or be a multiple of them)")
    if cfg.intermediate_size_mlp % size and any(not cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
        why.append(f"dense MLP width {cfg.intermediate_size_mlp}")
    if cfg.moe_layers:
        if cfg.intermediate_size % size:
            why.append(f"expert width {cfg.intermediate_size}")
        if expert_parallel and cfg.num_local_experts % size:
            why.append(f"{cfg.num_local_experts} experts")
    return why


def valid_sizes(cfg: TextConfig, expert_parallel: bool, limit: int = 64) -> list[int]:
    return [n for n in range(1, limit + 1) if not divides_shapes(cfg, n, expert_parallel)]


def check_size(cfg: TextConfig, size: int, expert_parallel: bool) -> None:
    """Raises ParallelConfigError naming the sizes that work, at start-up (not mid-load)."""
    if size < 1:
        raise ParallelConfigError(f"tensor_parallel_size must be at least 1, got {size}")
    why = divides_shapes(cfg, size, expert_parallel)
    if why:
        mode = "tensor + expert parallel" if expert_parallel else "tensor parallel"
        raise ParallelConfigError(
            f"tensor_parallel_size {size} does not divide this model's {', '.join(why)}; "
            f"valid sizes ({mode}): {', '.join(map(str, valid_sizes(cfg, expert_parallel)))}"
        )


@dataclass(frozen=True)
class Shard:
    """The part of the model rank `rank` of `size` holds."""

    rank: int
    size: int
    expert_parallel: bool = False

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    # -- attention -------------------------------------------------------------------------
    def heads(self, cfg: TextConfig) -> range:
        n = cfg.num_attention_heads // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def kv_heads(self, cfg: TextConfig) -> range:
        """Split when there are at least as many KV heads as ranks; otherwise each KV head is
        replicated on size / kv ranks (the ranks whose query heads read it)."""
        kv = cfg.num_key_value_heads
        if self.size <= kv:
            n = kv // self.size
            return range(self.rank * n, (self.rank + 1) * n)
        head = self.rank // (self.size // kv)
        return range(head, head + 1)

    # -- MLPs and experts -----------------------------------------------------------------
    def columns(self, width: int) -> range:
        """This rank's slice of an intermediate dimension (column-parallel out, row-parallel in)."""
        n = width // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def experts(self, cfg: TextConfig) -> range:
        """Routed experts held here: all of them (each one sliced) or, with expert parallelism,
        a contiguous run of whole experts."""
        e = cfg.num_local_experts
        if not self.expert_parallel:
            return range(e)
        n = e // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def expert_width(self, cfg: TextConfig) -> range:
        """The intermediate columns of each routed expert held here."""
        if self.expert_parallel:
            return range(cfg.intermediate_size)
        return self.columns(cfg.intermediate_size)

    # -- vocabulary --------------------------------------------------------------------------
    def padded_vocab(self, vocab: int) -> int:
        return -(-vocab // self.size) * self.size

    def vocab_rows(self, vocab: int) -> range:
        """Rows of the embedding / lm_head held here; the last rank's may run past the vocabulary
        (padding rows, zero, never sampled)."""
        n = self.padded_vocab(vocab) // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    def local_text_config(self, cfg: TextConfig) -> TextConfig:
        """The config a rank's modules are built from: local heads and widths. The vocabulary
        and expert count stay global (the embedding and experts are resized separately; the
        router always scores every expert)."""
        if not self.is_parallel:
            return cfg
        return dataclasses.replace(
            cfg,
            num_attention_heads=len(self.heads(cfg)),
            num_key_value_heads=len(self.kv_heads(cfg)),
            intermediate_size=len(self.columns(cfg.intermediate_size)) if cfg.moe_layers else cfg.intermediate_size,
            intermediate_size_mlp=len(self.columns(cfg.intermediate_size_mlp))
            if cfg.intermediate_size_mlp % self.size == 0
            else cfg.intermediate_size_mlp,
        )
