"""The Llama 4 text decoder over one flat batch of tokens.

Parameter names mirror the Hugging Face checkpoint (`layers.{i}.self_attn.q_proj.weight`, ...)
with the `model.` / `language_model.model.` prefix removed, so loading is a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import TextConfig
from herd.model.attention import AttentionMetadata, LayerKV, paged_attention
from herd.model.cpu_linear import PackedLinear, linear, prepack, prepack_fused, prepack_linears
from herd.model.layers import (
    RMSNorm,
    SwiGLU,
    apply_rope_complex,
    rms_normalize,
    rope_cis,
    rope_inv_freq,
)
from herd.model.moe import PackedExperts, routed_experts, warm_up


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.use_rope = cfg.uses_rope(layer)
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.chunk_size = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        self.eps = cfg.rms_norm_eps
        self.floor_scale = cfg.floor_scale
        self.attn_scale = cfg.attn_scale
        bias = cfg.attention_bias
        d, h = cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        self.packed_qkv: PackedLinear | None = None  # q, k and v in one GEMM (CPU; prepack_weights)

    def prepack_weights(self, rows_hint: int) -> list[nn.Module]:
        projections = [self.q_proj, self.k_proj, self.v_proj]
        self.packed_qkv = prepack_fused(projections, rows_hint)
        return projections if self.packed_qkv is not None else []

    def forward(self, x, rope: torch.Tensor, meta: AttentionMetadata, kv: LayerKV):
        """rope: the step's rotary factors (rope_cis of the positions)."""
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.packed_qkv is not None:
            qk, v = self.packed_qkv(x).split([(hq + hkv) * d, hkv * d], dim=-1)
        else:
            qk, v = torch.cat([self.q_proj(x), self.k_proj(x)], dim=-1), self.v_proj(x)
        # Query and key heads side by side: rotary embedding and QK norm run once for both.
        qk = qk.view(t, hq + hkv, d)
        if self.use_rope:
            qk = apply_rope_complex(qk, rope)
        if self.use_qk_norm:
            qk = rms_normalize(qk, self.eps)
        q, k = qk.split([hq, hkv], dim=1)
        v = v.view(t, hkv, d)
        if self.temperature_tuning:
            q = (q * nope_query_scales(meta, self.floor_scale, self.attn_scale)).to(q.dtype)
        out = paged_attention(q, k, v, kv, meta, d**-0.5, self.chunk_size)
        return self.o_proj(out.reshape(t, -1))


def nope_query_scales(meta: AttentionMetadata, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """[T, 1, 1] float32 query scales of the NoPE layers: they sharpen attention as the position
    grows (arXiv 2501.19399). The same for every such layer of a step: computed once."""
    key = ("nope_scales", floor_scale, attn_scale)
    if key not in meta.memo:
        pos = meta.positions.float()
        scales = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
        meta.memo[key] = scales[:, None, None]
    return meta.memo[key]


class RoutedExperts(nn.Module):
    """All routed experts of one MoE layer, stored fused as in bf16 checkpoints.

    gate_up_proj: [experts, hidden, 2 * intermediate] (gate half first), down_proj:
    [experts, intermediate, hidden]. All experts run as one grouped GEMM per matmul
    (herd/model/moe.py), each on just its tokens.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * intermediate))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.packed: PackedExperts | None = None  # set by prepack_weights (CPU)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """x [T, H]; expert_ids, scores [T, k] -> sum over k of expert(score * x), [T, H]."""
        return routed_experts(x, expert_ids, scores, self.gate_up_proj, self.down_proj, self.packed)

    def prepack_weights(self, rows_hint: int) -> list[nn.Module]:
        """Packs every expert's weights for oneDNN (CPU); [self] where it applied."""
        if self.gate_up_proj.device.type == "cpu":
            self.packed = PackedExperts.pack(self.gate_up_proj.detach(), self.down_proj.detach(), rows_hint)
        return [self] if self.packed is not None else []


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.experts = RoutedExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top_logits, expert_ids = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top_logits.float()).to(x.dtype)
        return self.shared_expert(x) + self.experts(x, expert_ids, scores)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.is_moe = cfg.is_moe(layer)
        self.feed_forward = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, meta: AttentionMetadata, kv: LayerKV):
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, kv)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class Llama4TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.packed_head = None  # set by prepack_for_cpu
        # Not a buffer: it is derived from the config, never loaded, and survives `to_empty`.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv: list[LayerKV],
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [T] (flat batch) -> final hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = rope_cis(meta.positions, self.inv_freq)
        for layer, layer_kv in zip(self.layers, kv):
            x = layer(x, rope, meta, layer_kv)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits over the vocabulary: float32, or the model's dtype with upcast=False (the
        sampler upcasts only rows that need it: a [rows x 202,048] conversion is not free)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(hidden, weight, self.packed_head)
        return logits.float() if upcast else logits

    def prepack_for_cpu(self, rows_hint: int) -> int:
        """Packs the weights of every linear layer and of the lm_head for oneDNN, once (see
        herd/model/cpu_linear.py); returns how many layers were packed."""
        count = prepack_linears(self, rows_hint)
        if self.lm_head is not None and isinstance(self.lm_head.forward, PackedLinear):
            self.packed_head = self.lm_head.forward
        else:
            self.packed_head = prepack(self.embed_tokens.weight, None, rows_hint)
            count += self.packed_head is not None
        return count


def warm_up_experts(model: nn.Module, max_rows: int) -> None:
    """Builds the CPU kernels of the routed experts' bucketed shapes before the first request
    (herd.model.moe.warm_up; all MoE layers share their shapes, so one layer is enough). Run it
    after prepack_for_cpu: packed experts have kernels of their own."""
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            if module.packed is not None:
                module.packed.warm_up(max_rows=min(max_rows, 512))
            else:
                warm_up(module.gate_up_proj, module.down_proj, max_rows=min(max_rows, 512))
            return


def param_count(cfg: TextConfig) -> int:
    model = torch.device("meta")
    with model:
        m = Llama4TextModel(cfg)
    return sum(math.prod(p.shape) for p in m.parameters())
