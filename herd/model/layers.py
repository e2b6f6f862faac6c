"""Small building blocks of the Llama 4 decoder: norms, rotary embeddings, SwiGLU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import RopeScaling
from herd.model.cpu_linear import prepack_fused


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, computed in float32 and returned in x's dtype.

    Llama 4's QK norm is exactly this with no weight (not F.normalize, which would divide by
    the L2 norm and be off by sqrt(head_dim)).
    """
    # F.rms_norm on the float32 copy is this formula in one kernel (bit-identical, fewer ops).
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with optional llama3 scaling (Scout)."""
    # Always on the CPU (the model may be built under a meta-device context); moved when used.
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    if scaling.high_freq_factor != scaling.low_freq_factor:
        # Scout sets both factors to 1: the medium band is then empty and this term would be 0/0.
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        scaled = torch.where(is_medium, smoothed, scaled)
    return scaled


def rope_cis(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The rotary factors e^(i * position * freq) [T, head_dim/2], complex64."""
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_complex(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """apply_rope_interleaved with the pairs as complex numbers: x [T, heads, head_dim] times
    cis [T, head_dim/2] (rope_cis), in float32. One complex product instead of four real ones
    and a stack: the same result up to rounding, several times faster on CPU."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * cis[:, None, :]).flatten(-2).type_as(x)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, heads, head_dim] by position, treating (x[2i], x[2i+1]) as one complex pair.

    Llama 4 uses this interleaved convention (Meta's complex-number form), not rotate-half.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return out.type_as(x)


class SwiGLU(nn.Module):
    """Dense gated MLP: down(silu(gate(x)) * up(x)). Used for dense layers and the shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.packed_gate_up = None  # gate and up in one GEMM (CPU; prepack_weights)

    def prepack_weights(self, rows_hint: int) -> list[nn.Module]:
        self.packed_gate_up = prepack_fused([self.gate_proj, self.up_proj], rows_hint)
        return [self.gate_proj, self.up_proj] if self.packed_gate_up is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_gate_up is not None:
            gate, up = self.packed_gate_up(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
