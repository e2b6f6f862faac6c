"""Linear layers on CPU with their weights prepacked once for oneDNN.

`F.linear` on CPU hands oneDNN a plain [out, in] weight on every call, and oneDNN reorders it
into its blocked layout each time: for a [49,152 x 256] lm_head that is most of the call
(measured at 32 rows, one thread: bf16 8.7 -> 5.6 ms, float32 21.5 -> 9.8 ms; dense and attention
projections 10-25% faster). Packing once at load is what oneDNN's own integrations do. bf16 is
bit-identical; float32 differs by rounding only (another kernel, ~5e-6).

The plain weight stays (embedding lookups, state_dict, sharding read it): packed layers cost
their weight's memory twice. Packing is skipped where torch has no oneDNN.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("herd.model")

PACKABLE = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear:
    """y = x @ weight.T (+ bias) through a weight packed for oneDNN; x [..., in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int):
        self.out_features = weight.shape[0]
        self.bias = bias
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)


def prepack(weight: torch.Tensor, bias: torch.Tensor | None = None, rows_hint: int = 64):
    """A PackedLinear for this CPU weight, or None where packing does not apply."""
    if not available() or weight.device.type != "cpu" or weight.dtype not in PACKABLE or weight.dim() != 2:
        return None
    if bias is not None and bias.dtype != weight.dtype:
        return None
    try:
        return PackedLinear(weight, bias, rows_hint)
    except RuntimeError as exc:  # a oneDNN build without this weight type
        log.info("oneDNN weight packing unavailable (%s): plain F.linear", exc)
        return None


def prepack_linears(model: nn.Module, rows_hint: int = 64) -> int:
    """Every plain nn.Linear of `model` on CPU computes through a packed weight from now on
    (its forward is replaced; hooks still run). Returns how many were packed."""
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        packed = prepack(module.weight, module.bias, rows_hint)
        if packed is not None:
            module.forward = packed
            count += 1
    return count


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedLinear | None) -> torch.Tensor:
    return packed(x) if packed is not None else F.linear(x, weight)
