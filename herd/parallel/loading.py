"""Reads one rank's shard of a checkpoint: memory-mapped slices, never a whole tensor that is
split across ranks.

For every checkpoint tensor (by its herd name) a `Cut` says which rows or columns this rank
keeps: one range along one dimension, sometimes two ranges (the gate and up halves of a fused
experts tensor), sometimes padded with zero rows (the vocabulary, when the rank count does not
divide it). safetensors' `get_slice` reads just those bytes from the mapped file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.config import TextConfig
from herd.parallel.sizes import Shard

_LAYER = r"layers\.\d+\."
_Q = re.compile(_LAYER + r"self_attn\.q_proj\.(weight|weight_scale|bias)$")
_KV = re.compile(_LAYER + r"self_attn\.[kv]_proj\.(weight|weight_scale|bias)$")
_O = re.compile(_LAYER + r"self_attn\.o_proj\.weight$")
_MLP_IN = re.compile(_LAYER + r"feed_forward\.(shared_expert\.)?(gate|up)_proj\.(weight|weight_scale)$")
_MLP_OUT = re.compile(_LAYER + r"feed_forward\.(shared_expert\.)?down_proj\.weight$")
_EXPERT = re.compile(r"^(" + _LAYER + r"feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.(weight|weight_scale)$")
_FUSED_GATE_UP = re.compile(_LAYER + r"feed_forward\.experts\.gate_up_proj(_scale)?$")
_FUSED_DOWN = re.compile(_LAYER + r"feed_forward\.experts\.down_proj(_scale)?$")
_VOCAB = re.compile(r"^(embed_tokens|lm_head)\.weight$")


@dataclass(frozen=True)
class Cut:
    dim: int
    ranges: tuple[range, ...]
    limit: int | None = None  # rows past this index are padding (zeros), not read

    def local_shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(full)
        shape[self.dim] = sum(len(r) for r in self.ranges)
        return tuple(shape)


def _heads(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


class ShardPlan:
    """Names and cuts of one rank's tensors."""

    def __init__(self, cfg: TextConfig, shard: Shard):
        self.cfg = cfg
        self.shard = shard

    def local_name(self, name: str) -> str | None:
        """The herd name a checkpoint tensor loads into here; None when another rank holds it
        (a whole expert, under expert parallelism)."""
        m = _EXPERT.match(name)
        if m and self.shard.expert_parallel:
            experts = self.shard.experts(self.cfg)
            e = int(m.group(2))
            if e not in experts:
                return None
            return f"{m.group(1)}.{e - experts.start}.{m.group(3)}_proj.{m.group(4)}"
        return name

    def cut(self, name: str) -> Cut | None:
        """How `name` (a herd name, before local_name) is cut; None: held whole."""
        cfg, shard = self.cfg, self.shard
        if not shard.is_parallel:
            return None
        d = cfg.head_dim
        if _Q.search(name):
            return Cut(0, (_heads(shard.heads(cfg), d),))
        if _KV.search(name):
            return Cut(0, (_heads(shard.kv_heads(cfg), d),))
        if _O.search(name):
            return Cut(1, (_heads(shard.heads(cfg), d),))
        m = _MLP_IN.search(name)
        if m:
            width = cfg.intermediate_size if m.group(1) else self._mlp_width(name)
            return Cut(0, (shard.columns(width),))
        m = _MLP_OUT.search(name)
        if m:
            width = cfg.intermediate_size if m.group(1) else self._mlp_width(name)
            return Cut(1, (shard.columns(width),))
        m = _EXPERT.match(name)
        if m:
            if shard.expert_parallel:
                return None  # whole experts; which ones is local_name's business
            part, kind = m.group(3), m.group(4)
            cols = shard.expert_width(cfg)
            if part == "down":
                return None if kind == "weight_scale" else Cut(1, (cols,))
            return Cut(0, (cols,))
        m = _FUSED_GATE_UP.search(name)
        if m:
            if shard.expert_parallel:
                return Cut(0, (shard.experts(cfg),))
            cols, inter = shard.expert_width(cfg), cfg.intermediate_size
            # [E, hidden, 2I] (weights) or [E, 2I(, 1)] (scales): gate columns, then up columns.
            return Cut(1 if m.group(1) else 2, (cols, range(inter + cols.start, inter + cols.stop)))
        m = _FUSED_DOWN.search(name)
        if m:
            if shard.expert_parallel:
                return Cut(0, (shard.experts(cfg),))
            return None if m.group(1) else Cut(1, (shard.expert_width(cfg),))
        if _VOCAB.match(name):
            rows = shard.vocab_rows(cfg.vocab_size)
            return Cut(0, (rows,), limit=cfg.vocab_size)
        return None

    def _mlp_width(self, name: str) -> int:
        return self.cfg.intermediate_size_mlp

    def reader(self, handle, ckpt_name: str, file: Path, name: str):
        return ShardReader(handle, ckpt_name, file, self.cut(name))


class ShardReader:
    """checkpoint._Reader's interface (is_fp8, shape, read whole, read one expert), over this
    rank's cut of the tensor."""

    def __init__(self, handle, name: str, file: Path, cut: Cut | None):
        self.handle, self.name, self.file, self.cut = handle, name, file, cut

    def _slice(self):
        return self.handle.get_slice(self.name)

    @property
    def is_fp8(self) -> bool:
        return self._slice().get_dtype() == "F8_E4M3"

    @property
    def shape(self) -> tuple[int, ...]:
        full = tuple(self._slice().get_shape())
        return full if self.cut is None else self.cut.local_shape(full)

    def __call__(self) -> torch.Tensor:
        return self._read(())

    def expert(self, e: int) -> torch.Tensor:
        """Local expert e (the leading index), cut like the whole tensor."""
        if self.cut is not None and self.cut.dim == 0:
            return self._read((self.cut.ranges[0][e],), skip_cut=True)
        return self._read((e,))

    def _read(self, lead: tuple[int, ...], skip_cut: bool = False) -> torch.Tensor:
        from herd.checkpoint import CheckpointError

        sl = self._slice()
        try:
            if self.cut is None or skip_cut:
                return sl[lead] if lead else sl[:]
            shape = list(sl.get_shape())
            dim = self.cut.dim
            pieces = []
            for r in self.cut.ranges:
                stop = min(r.stop, self.cut.limit) if self.cut.limit is not None else r.stop
                index = [slice(None)] * len(shape)
                index[dim] = slice(r.start, max(stop, r.start))
                index = tuple(lead) + tuple(index[len(lead) :])
                piece = sl[index]
                short = len(r) - piece.shape[dim - len(lead)]
                if short:  # padding rows past the vocabulary
                    pad_shape = list(piece.shape)
                    pad_shape[dim - len(lead)] = short
                    piece = torch.cat([piece, piece.new_zeros(pad_shape)], dim=dim - len(lead))
                pieces.append(piece)
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim - len(lead))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {self.name} from {self.file.name}: {e}") from None
