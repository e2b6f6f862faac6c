"""The Llama 4 text model as one rank of a tensor (and expert) parallel group holds it.

The model's own modules are reused, built at their local sizes (heads, KV heads and MLP widths
divided by the rank count, see Shard.local_text_config): q/k/v and gate/up are then
column-parallel and o_proj/down row-parallel without any new linear class, and an FP8 layer
keeps its per-row scales with its rows. What is added here:
- one all-reduce after each attention block and each feed-forward block (dense MLP, or the
  MoE's shared + routed sum), as forward hooks: the partial sums of the row-parallel matmuls;
- a vocabulary-parallel embedding and lm_head, logits gathered over the ranks;
- with expert parallelism, routed experts that compute only the tokens routed to this rank's
  experts (the compute itself is whatever the experts module does with local ids).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import TextConfig
from herd.model.cpu_linear import linear, prepack, prepack_linears
from herd.model.llama4 import Llama4TextModel, MoE
from herd.parallel.sizes import Shard

if TYPE_CHECKING:  # torch.distributed is slow to import; building shapes (herd plan) needs none of it
    from herd.parallel.comm import Group


class VocabParallelEmbedding(nn.Module):
    """Rows [first, first + n) of the embedding; a token outside them looks up zeros, and the
    all-reduce adds the one rank's row that holds it."""

    def __init__(self, rows: range, hidden: int, group: Group):
        super().__init__()
        self.first = rows.start
        self.num_rows = len(rows)
        self.group = group
        self.weight = nn.Parameter(torch.empty(self.num_rows, hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first
        here = (local >= 0) & (local < self.num_rows)
        out = F.embedding(torch.where(here, local, 0), self.weight)
        out = out * here[:, None].to(out.dtype)
        return self.group.all_reduce(out)


class VocabParallelHead(nn.Module):
    """The lm_head's rows [first, first + n); logits come back whole (all-gathered)."""

    def __init__(self, rows: range, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(len(rows), hidden))


class ShardedLlama4TextModel(Llama4TextModel):
    """Llama4TextModel with local shapes; `config` is the rank's local config, `full_config`
    the model's."""

    def __init__(self, cfg: TextConfig, shard: Shard, group: Group):
        super().__init__(shard.local_text_config(cfg))
        self.full_config = cfg
        self.shard = shard
        self.group = group
        rows = shard.vocab_rows(cfg.vocab_size)
        self.embed_tokens = VocabParallelEmbedding(rows, cfg.hidden_size, group)
        if self.lm_head is not None:
            self.lm_head = VocabParallelHead(rows, cfg.hidden_size)
        if shard.expert_parallel:
            experts = shard.experts(cfg)
            for layer in self.layers:
                if isinstance(layer.feed_forward, MoE):
                    old = layer.feed_forward.experts
                    layer.feed_forward.experts = type(old)(len(experts), cfg.hidden_size, cfg.intermediate_size)
        for layer in self.layers:
            layer.self_attn.register_forward_hook(self._reduce)
            layer.feed_forward.register_forward_hook(self._reduce)

    def _reduce(self, module, inputs, output):
        return self.group.all_reduce(output)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        local = linear(hidden, weight, self.packed_head)
        logits = self.group.all_gather_last_dim(local)[..., : self.full_config.vocab_size]
        return logits.float() if upcast else logits

    def prepack_for_cpu(self, rows_hint: int) -> int:
        """As the whole model does (herd/model/cpu_linear.py), with this rank's lm_head rows."""
        count = prepack_linears(self, rows_hint)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.packed_head = prepack(weight, None, rows_hint)
        return count + (self.packed_head is not None)

    @torch.no_grad()
    def after_load(self) -> None:
        """A row-parallel bias is added once, by rank 0 (the all-reduce would add it N times).
        With expert parallelism, each experts module (now converted and allocated) sees only
        the (token, expert) pairs of its own experts, with local expert ids."""
        for layer in self.layers:
            if layer.self_attn.o_proj.bias is not None and self.shard.rank:
                layer.self_attn.o_proj.bias.zero_()
        if self.shard.expert_parallel:
            first = self.shard.experts(self.full_config).start
            for layer in self.layers:
                if isinstance(layer.feed_forward, MoE):
                    local_experts_only(layer.feed_forward.experts, first)


def local_experts_only(experts: nn.Module, first: int) -> None:
    """Wraps `experts.forward(x, expert_ids, scores)` so that it computes only the pairs routed
    to experts [first, first + experts.num_experts), with ids renumbered from 0; the result for
    pairs routed elsewhere is zero here (another rank adds it in the all-reduce)."""
    compute = experts.forward
    count = experts.num_experts

    def forward(x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        local = expert_ids - first
        here = (local >= 0) & (local < count)
        token, slot = here.nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if token.numel():
            y = compute(x[token], local[token, slot][:, None], scores[token, slot][:, None])
            out.index_add_(0, token, y)
        return out

    experts.forward = forward
