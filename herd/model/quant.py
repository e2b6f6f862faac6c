"""FP8 (E4M3) weights and activations: quantize, dequantize, and the scaled matmul dispatch.

The scheme is compressed-tensors' FP8_DYNAMIC, the one Meta's Llama 4 FP8 release uses:
- weights: per output channel (row-wise) scale = amax(|row|) / 448, stored 1 byte/param;
- activations: quantized per token right before each FP8 matmul, scale = amax(|token|) / 448
  (for routed experts after the router score has multiplied the input).

Two compute paths, picked per device when the model is loaded (and logged):
- "scaled_mm": CUDA with FP8 units (compute capability 8.9+): `torch._scaled_mm` with
  row-wise scales; routed experts use `torch._scaled_grouped_mm` when it works on the device.
- "dequant": everywhere else (CPU, A100...): the same W8A8 numerics done in the compute dtype:
  the activation is quantized and dequantized per token, the layer's weight is dequantized at
  compute time into a temporary (one layer at a time, never kept).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.moe import grouped_swiglu, route

log = logging.getLogger("herd.quant")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value

SCALED_MM = "scaled_mm"
DEQUANT = "dequant"


# -- numerics ----------------------------------------------------------------------------------
def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (E4M3 weight of the same shape, scale [..., out, 1] in w's dtype).

    Computed exactly as compressed-tensors does for FP8_DYNAMIC weights (llm-compressor's
    offline tool), in the weight's own dtype: scale = amax / 448 (a zero row gets the dtype's
    eps), q = clamp(w / scale, +-448) cast to E4M3. Quantize-on-load therefore writes the same
    bytes as the offline tool.
    """
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = amax / torch.tensor(FP8_MAX, dtype=w.dtype, device=w.device)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype, device=w.device), scale)
    q = torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (E4M3 [T, K], float32 scale [T, 1]); the scale is computed in x's dtype
    (as compressed-tensors' dynamic token strategy does) and widened to float32 exactly."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / torch.tensor(FP8_MAX, dtype=x.dtype, device=x.device)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype, device=x.device), scale)
    q = torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.float()


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize per token, in x's dtype: what an FP8 matmul sees of x."""
    q, scale = quantize_per_token(x)
    return q.to(x.dtype) * scale.to(x.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E4M3 weight [out, in] with scale [out] -> dtype."""
    return q.to(dtype) * scale.to(dtype)[..., None]


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    """y = dequant(quant(x)) @ dequant(weight).T; x [T, K], weight E4M3 [N, K], scale f32 [N]."""
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[0])
    if backend == SCALED_MM:
        xq, xs = quantize_per_token(x)
        # mat_b must be column-major: the transposed view of the row-major [N, K] weight is.
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale[None, :], out_dtype=torch.bfloat16)
        return y.to(x.dtype)
    return F.linear(fake_quantize_per_token(x), dequantize(weight, scale, x.dtype))


# -- modules -------------------------------------------------------------------------------------
class Fp8Linear(nn.Module):
    """A bias-free (or bf16-bias) linear layer with an E4M3 weight and per-row float32 scales.

    Parameter names match compressed-tensors checkpoints (`weight`, `weight_scale`), so loading
    stays a rename.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, backend: str = DEQUANT):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = fp8_linear(x.reshape(-1, shape[-1]), self.weight, self.weight_scale, self.backend)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Fp8RoutedExperts(nn.Module):
    """All routed experts of one MoE layer in FP8, stored fused but in [out, in] (row) layout:

    gate_up_weight [experts, 2 * intermediate, hidden] (gate rows first) with gate_up_scale
    [experts, 2 * intermediate]; down_weight [experts, hidden, intermediate] with down_scale
    [experts, hidden]. Row layout is what per-expert checkpoints hold and what `_scaled_mm`
    wants (its transposed view is column-major). Same contract as RoutedExperts.forward.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, backend: str = DEQUANT):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        e = num_experts
        self.gate_up_weight = nn.Parameter(torch.empty(e, 2 * intermediate, hidden, dtype=FP8_DTYPE), requires_grad=False)
        self.gate_up_scale = nn.Parameter(torch.empty(e, 2 * intermediate, dtype=torch.float32), requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(e, hidden, intermediate, dtype=FP8_DTYPE), requires_grad=False)
        self.down_scale = nn.Parameter(torch.empty(e, hidden, dtype=torch.float32), requires_grad=False)
        self.backend = backend
        self.grouped = False  # torch._scaled_grouped_mm, set when it was probed to work here

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Score first, then per-token FP8 quantization inside each matmul (Llama 4's order).
        routed_in, token_of, counts = route(x, expert_ids, scores, self.num_experts)
        if self.grouped:
            y = self._grouped(routed_in, counts)
        elif self.backend == DEQUANT:
            y = self._dequant_grouped(routed_in, counts)
        else:  # _scaled_mm without a grouped form on this GPU: one GEMM pair per expert
            y = routed_in.new_empty(routed_in.shape)
            start = 0
            for expert, count in enumerate(counts.tolist()):
                if count == 0:
                    continue
                end = start + count
                gate_up = fp8_linear(routed_in[start:end], self.gate_up_weight[expert], self.gate_up_scale[expert], self.backend)
                gate, up = gate_up.chunk(2, dim=-1)
                y[start:end] = fp8_linear(up * F.silu(gate), self.down_weight[expert], self.down_scale[expert], self.backend)
                start = end
        return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))

    def _dequant_grouped(self, routed_in: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """W8A8 emulated: the experts that have rows this step are dequantized (into temporaries,
        [in, out] views) and run as one grouped GEMM with per-token fake-quantized inputs."""
        active = counts.nonzero()[:, 0]
        dtype = routed_in.dtype
        gate_up = dequantize(self.gate_up_weight[active], self.gate_up_scale[active], dtype).transpose(1, 2)
        down = dequantize(self.down_weight[active], self.down_scale[active], dtype).transpose(1, 2)
        return grouped_swiglu(routed_in, counts[active], gate_up, down, act_quant=fake_quantize_per_token)

    def _grouped(self, routed_in: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Both expert matmuls as one grouped FP8 GEMM each (CUDA, tokens sorted by expert)."""
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xq, xs = quantize_per_token(routed_in)
        gate_up = torch._scaled_grouped_mm(
            xq, self.gate_up_weight.transpose(1, 2), xs[:, 0], self.gate_up_scale, offs=offs, out_dtype=torch.bfloat16
        )
        gate, up = gate_up.to(routed_in.dtype).chunk(2, dim=-1)
        hq, hs = quantize_per_token(up * F.silu(gate))
        return torch._scaled_grouped_mm(
            hq, self.down_weight.transpose(1, 2), hs[:, 0], self.down_scale, offs=offs, out_dtype=torch.bfloat16
        )


# -- which modules, and which path ------------------------------------------------------------
@dataclass(frozen=True)
class FP8Policy:
    """Which Linear modules quantize-on-load turns into FP8: every Linear of the text model not
    matched by `ignore` (names in Hugging Face spelling, `re:` for a regular expression matched
    from the start, as compressed-tensors does). Router, lm_head, embeddings, norms and the
    vision tower are never quantized, whatever the list says."""

    name: str
    ignore: tuple[str, ...] = field(default_factory=tuple)


# The ignore list of Meta's Llama-4-Maverick-17B-128E-Instruct-FP8: only routed experts are FP8.
META_IGNORE = (
    "re:.*self_attn",
    "re:.*router",
    "re:vision_model.*",
    "re:multi_modal_projector.*",
    "re:.*shared_expert",
    "re:.*feed_forward.gate_proj",
    "re:.*feed_forward.up_proj",
    "re:.*feed_forward.down_proj",
    "re:.*lm_head",
)
POLICIES = {
    "fp8": FP8Policy("fp8", META_IGNORE),
    "fp8-all": FP8Policy("fp8-all", ("re:.*router", "re:vision_model.*", "re:multi_modal_projector.*", "re:.*lm_head")),
}


def resolve_policy(quantization: str | FP8Policy | None) -> FP8Policy | None:
    if quantization is None or isinstance(quantization, FP8Policy):
        return quantization
    try:
        return POLICIES[quantization]
    except KeyError:
        raise ValueError(f"unsupported quantization {quantization!r}: use one of {sorted(POLICIES)}") from None


def matches_any(name: str, patterns) -> bool:
    """compressed-tensors' rule: `re:` patterns match from the start of the name (re.match),
    other entries must equal the name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name:
            return True
    return False


NEVER_FP8 = re.compile(r"(^|\.)(router|lm_head|embed_tokens)$")


def fp8_backend(device: torch.device | str) -> str:
    """scaled_mm on CUDA GPUs with FP8 units (compute capability 8.9+), else dequant.
    HERD_FP8_BACKEND=dequant forces the portable path (for comparisons and benchmarks)."""
    forced = os.environ.get("HERD_FP8_BACKEND")
    if forced in (SCALED_MM, DEQUANT):
        return forced
    device = torch.device(device)
    if device.type == "cuda" and hasattr(torch, "_scaled_mm"):
        if torch.cuda.get_device_capability(device) >= (8, 9):
            return SCALED_MM
    return DEQUANT


def probe_grouped(device: torch.device) -> bool:
    """Whether torch._scaled_grouped_mm runs here and agrees with the per-expert path."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        experts = Fp8RoutedExperts(2, 64, 32, SCALED_MM).to(device)
        for w, s in ((experts.gate_up_weight, experts.gate_up_scale), (experts.down_weight, experts.down_scale)):
            q, sc = quantize_rowwise(torch.randn(w.shape, generator=g).to(device))
            w.data.copy_(q)
            s.data.copy_(sc[..., 0])
        x = torch.randn(16, 64, generator=g).to(device, torch.bfloat16)
        ids = torch.randint(0, 2, (16, 1), generator=g).to(device)
        scores = torch.rand(16, 1, generator=g).to(device, torch.bfloat16)
        ref = experts(x, ids, scores)
        experts.grouped = True
        got = experts(x, ids, scores)
        return bool(torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2))
    except Exception as e:  # not built for this GPU / this torch: the loop of _scaled_mm it is
        log.info("grouped FP8 GEMM unavailable here (%s); experts use one _scaled_mm each", e)
        return False


def convert_to_fp8(model: nn.Module, names: set[str], backend: str = DEQUANT) -> None:
    """Replaces the named nn.Linear / RoutedExperts modules by their FP8 versions, in place.
    Meant for a model on the meta device, before `to_empty` allocates (1 byte per weight)."""
    from herd.model.llama4 import RoutedExperts

    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        device = next(old.parameters()).device
        with torch.device(device):  # on meta: nothing is allocated yet
            if isinstance(old, nn.Linear):
                new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, backend)
                if new.bias is not None:
                    new.bias.data = new.bias.data.to(old.bias.dtype)
            elif isinstance(old, RoutedExperts):
                e, h, i2 = old.gate_up_proj.shape
                new = Fp8RoutedExperts(e, h, i2 // 2, backend)
            else:
                raise TypeError(f"{name} ({type(old).__name__}) has no FP8 version")
        setattr(parent, child, new)


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the text model's modules that may be FP8: Linear layers and routed experts,
    never the router or lm_head."""
    from herd.model.llama4 import RoutedExperts

    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, RoutedExperts)) and not NEVER_FP8.search(name):
            out.append(name)
    return out


def policy_modules(model: nn.Module, policy: FP8Policy) -> set[str]:
    """The herd module names `policy` quantizes. Names are matched in Llama4ForCausalLM spelling
    (`model.layers.3.feed_forward.experts.0.gate_proj`); a routed-experts block is quantized when
    its experts' gate_proj is (experts of one layer are all FP8 or all not)."""
    from herd.model.llama4 import RoutedExperts

    chosen = set()
    for name in quantizable_modules(model):
        module = model.get_submodule(name)
        hf = f"model.{name}"
        if isinstance(module, RoutedExperts):
            probe = [f"{hf}.{e}.{p}_proj" for e in range(module.num_experts) for p in ("gate", "up", "down")]
            picked = [not matches_any(n, policy.ignore) for n in probe]
            if any(picked) and not all(picked):
                raise ValueError(f"policy {policy.name!r} quantizes only some of {name}: herd keeps a layer's experts alike")
            if all(picked):
                chosen.add(name)
        elif not matches_any(hf, policy.ignore):
            chosen.add(name)
    return chosen


def describe(model: nn.Module) -> str:
    """One line for the start-up log: how much is FP8 and which matmul path runs it."""
    fp8_params = other = 0
    backends = set()
    grouped = False
    for m in model.modules():
        if isinstance(m, (Fp8Linear, Fp8RoutedExperts)):
            backends.add(m.backend)
            grouped |= getattr(m, "grouped", False)
    for p in model.parameters():
        if p.dtype == FP8_DTYPE:
            fp8_params += p.numel()
        else:
            other += p.numel()
    if not fp8_params:
        return "weights: no FP8"
    path = "/".join(sorted(backends))
    if SCALED_MM in backends:
        path += " (torch._scaled_mm row-wise" + (", grouped experts)" if grouped else ", one GEMM per expert)")
    else:
        path += " (W8A8 emulated: per-token activation quant, weights dequantized per layer)"
    return f"weights: {fp8_params / 1e6:.2f}M params FP8 E4M3 + {other / 1e6:.2f}M in higher precision; FP8 matmul path: {path}"
