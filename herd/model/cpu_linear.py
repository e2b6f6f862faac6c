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
        self.op = torch.ops.mkldnn._linear_pointwise.default  # the overload itself: less dispatch per call
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # the engine's flat batches: no reshapes (a decode step makes hundreds of calls)
            return self.op(x, self.packed, self.bias, "none", [], "")
        shape = x.shape
        y = self.op(x.reshape(-1, shape[-1]), self.packed, self.bias, "none", [], "")
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


def prepack_fused(linears: list[nn.Module], rows_hint: int = 64) -> PackedLinear | None:
    """One packed linear that computes several plain nn.Linear of the same input side by side
    (their outputs concatenated, in order), or None where that does not apply. At decode
    shapes one GEMM costs about as much as each of the small ones it replaces."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return None
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in linears])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    return prepack(weight, bias, rows_hint)


def prepack_linears(model: nn.Module, rows_hint: int = 64) -> int:
    """Every plain nn.Linear of `model` on CPU computes through a packed weight from now on
    (its forward is replaced; hooks still run). A module with a `prepack_weights(rows)` method
    (fused projections, routed experts) packs its own weights first; the linears it returns
    are computed by it and left unpacked here. Returns how many weights were packed."""
    count = 0
    covered: set[int] = set()
    for module in model.modules():  # parents before their children
        if hasattr(module, "prepack_weights"):
            done = module.prepack_weights(rows_hint)
            covered.update(id(m) for m in done)
            count += bool(done)
        if type(module) is not nn.Linear or id(module) in covered:
            continue
        packed = prepack(module.weight, module.bias, rows_hint)
        if packed is not None:
            module.forward = packed
            count += 1
    return count


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedLinear | None) -> torch.Tensor:
    return packed(x) if packed is not None else F.linear(x, weight)
