"""Routed experts of one MoE layer as grouped GEMMs: every local expert in one call per matmul.

The entry point is `routed_experts(x, expert_ids, scores, gate_up, down)`. It takes the weight
tensors of whichever experts this process holds (any number of experts, any intermediate size),
so tensor parallelism (a slice of every expert's intermediate dim) and expert parallelism (a
slice of whole experts, ids renumbered from 0, pairs of other ranks' experts given id -1 or left
out) plug in without touching the kernel choice.

How the grouped GEMM runs depends on the device (`grouped_swiglu`):
- CUDA: `torch._grouped_mm` over the rows sorted by expert (one kernel per matmul, no host
  sync), when `probe_grouped_mm` found that it works on the device; else the padded path below.
- CPU with oneDNN (bf16 / float32 weights): each expert's two weights are packed once for
  oneDNN at start-up (`PackedExperts`) and only the experts that have rows run, one after the
  other, each on its rows padded to a bucket size (below). Measured against the padded batched
  matmuls below at 8-256 tokens over 16 experts: 1.2-1.7x faster, bit-identical in bf16: a
  batched matmul makes oneDNN reorder every expert's weight on every call.
- CPU without packing (and the CUDA fallback): rows are padded to bucket sizes (1..8, then four sizes per power
  of two), so the matmul shapes a run meets are few and repeat: oneDNN builds a kernel for each
  new shape (1-2 ms the first time in bf16), and a step's per-expert token counts never repeat
  otherwise. In bf16/fp16, when padding every expert to the largest bucket at most quadruples
  the rows, the experts run as one `bmm` over [E, C, H]; otherwise each expert is padded to its
  own bucket and `torch._grouped_mm` walks the groups in C++. When only a few experts have rows
  (decoding one or a few sequences) those experts just run one after the other: any grouped call
  costs more than that.
Numerics are those of the per-expert loop (`swiglu_loop`, kept as the reference): the same
matmuls per row, only batched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from herd.model.cpu_linear import PackedLinear, prepack

log = logging.getLogger("herd.moe")

# Set per device by probe_grouped_mm: whether torch._grouped_mm runs there and matches the loop.
_GROUPED_MM_OK: dict[str, bool] = {}


def route(
    x: torch.Tensor, expert_ids: torch.Tensor, scores: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups a layer's (token, expert) pairs by expert.

    x [T, H]; expert_ids, scores [T, k]; ids outside [0, num_experts) (another rank's experts)
    are left out. Returns the expert inputs sorted by expert [N, H], already multiplied by their
    router scores (Llama 4 scales the expert's input, not its output), the token each row came
    from [N], and the row count of every expert [num_experts].
    """
    top_k = expert_ids.shape[1]
    flat = expert_ids.flatten()
    flat_scores = scores.flatten()
    pair = None  # which (token, k) pairs are kept, when some belong to other ranks
    lo, hi = torch.aminmax(flat)
    if lo < 0 or hi >= num_experts:
        pair = ((flat >= 0) & (flat < num_experts)).nonzero()[:, 0]
        flat, flat_scores = flat[pair], flat_scores[pair]
    order = torch.argsort(flat, stable=True)
    pair_of = order if pair is None else pair[order]
    token_of = pair_of if top_k == 1 else pair_of // top_k  # pairs are laid out [T, k] row-major
    rows = x.index_select(0, token_of) * flat_scores.index_select(0, order)[:, None].to(x.dtype)
    return rows, token_of, torch.bincount(flat, minlength=num_experts)


def bucket_sizes(counts: torch.Tensor) -> torch.Tensor:
    """Each count rounded up to a bucket: 0 stays 0, 1..8 exact, then four sizes per power of two
    (10, 12, 14, 16, 20, 24, 28, 32, 40, ...): at most 25% padding, a few dozen shapes up to 4K."""
    c = counts.clamp(min=1).double()
    step = torch.clamp(torch.exp2(torch.floor(torch.log2(c))) / 4, min=1)
    return (torch.ceil(c / step) * step).long() * (counts > 0)


def swiglu_loop(
    rows: torch.Tensor, counts: list[int], gate_up: torch.Tensor, down: torch.Tensor, act_quant: Callable | None = None
) -> torch.Tensor:
    """The reference: one expert at a time (rows sorted by expert, counts per expert)."""
    out = rows.new_empty(rows.shape[0], down.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start : start + n] = _swiglu(rows[start : start + n], gate_up[e], down[e], act_quant)
            start += n
    return out


def _swiglu(x, gate_up, down, act_quant):
    q = act_quant or _identity
    gate, up = (q(x) @ gate_up).chunk(2, dim=-1)
    return q(up * F.silu(gate)) @ down


# At most this many experts with rows (decoding a few sequences): one matmul pair per such expert
# beats a grouped call on CPU, which pays for every expert, even one with no rows (about 2 us per
# empty group and matmul: 0.6 ms a layer at 128 experts).
FEW_ACTIVE_EXPERTS = 8
# Low-precision CPU matmuls pad all experts to one bucket and run as a single bmm when that at
# most quadruples the rows of a small batch (at most 1.5x from UNIFORM_PAD_ROWS rows on, where
# the padding is real work): bmm streams the weights in one pass (measured 1.2-1.4x faster than
# the grouped walk at 32-256 tokens, bf16); float32 bmm is slower than the walk, so it never pads.
UNIFORM_PAD_LIMIT = 4
UNIFORM_PAD_ROWS = 512


def grouped_swiglu(
    rows: torch.Tensor,
    counts: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """down(up * silu(gate)) for rows sorted by expert, all experts at once.

    rows [N, H] (the first counts[0] rows go to expert 0, ...); counts [E] long; gate_up
    [E, H, 2I] (gate half first); down [E, I, H]; act_quant, if given, is applied to the input of
    each matmul (per-row, e.g. FP8 fake quantization); packed: the same weights packed for
    oneDNN (CPU), used instead of gate_up / down when given. Returns [N, H].
    """
    n = rows.shape[0]
    if n == 0:
        return rows.new_zeros(0, down.shape[-1])
    if packed is not None and act_quant is None:
        return packed.swiglu(rows, counts.tolist())
    if rows.is_cuda and grouped_mm_works(rows.device) and act_quant is None and rows.dtype == torch.bfloat16:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gate, up = torch._grouped_mm(rows, gate_up, offs=offs).chunk(2, dim=-1)
        return torch._grouped_mm(up * F.silu(gate), down, offs=offs)
    sizes = counts.tolist()
    if sum(1 for c in sizes if c) <= FEW_ACTIVE_EXPERTS:
        return swiglu_loop(rows, sizes, gate_up, down, act_quant)
    num_experts = counts.shape[0]
    capacity = int(bucket_sizes(counts.max()[None])[0])
    limit = UNIFORM_PAD_LIMIT if n < UNIFORM_PAD_ROWS else min(UNIFORM_PAD_LIMIT, 1.5)
    if rows.dtype != torch.float32 and num_experts * capacity <= limit * n:
        return _uniform_bmm(rows, counts, capacity, gate_up, down, act_quant)
    return _bucketed_grouped(rows, counts, gate_up, down, act_quant)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _padded_layout(counts: torch.Tensor, padded: torch.Tensor, n: int) -> torch.Tensor:
    """Where each sorted row goes once every expert's rows are padded to `padded` rows."""
    starts = torch.cumsum(counts, 0) - counts
    padded_starts = torch.cumsum(padded, 0) - padded
    expert_of_row = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=n)
    return torch.arange(n, device=counts.device) + (padded_starts - starts)[expert_of_row]


def _uniform_bmm(rows, counts, capacity, gate_up, down, act_quant):
    """Every expert padded to `capacity` rows: two batched matmuls over [E, capacity, H]."""
    q = act_quant or _identity
    n, hidden = rows.shape
    num_experts = counts.shape[0]
    dest = _padded_layout(counts, torch.full_like(counts, capacity), n)
    buf = rows.new_zeros(num_experts * capacity, hidden)
    buf[dest] = rows
    gate, up = torch.bmm(q(buf).view(num_experts, capacity, hidden), gate_up).chunk(2, dim=-1)
    y = torch.bmm(q(up * F.silu(gate)), down)
    return y.view(num_experts * capacity, -1)[dest]


def _bucketed_grouped(rows, counts, gate_up, down, act_quant):
    """Each expert's rows padded to its own bucket size; torch._grouped_mm walks the groups."""
    q = act_quant or _identity
    n, hidden = rows.shape
    padded = bucket_sizes(counts)
    dest = _padded_layout(counts, padded, n)
    offs = torch.cumsum(padded, 0).to(torch.int32)
    buf = rows.new_zeros(int(offs[-1]), hidden)
    buf[dest] = rows
    gate, up = torch._grouped_mm(q(buf), gate_up, offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(q((up * F.silu(gate)).contiguous()), down, offs=offs)
    return y[dest]


def routed_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    scores: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    packed: PackedExperts | None = None,
) -> torch.Tensor:
    """x [T, H]; expert_ids, scores [T, k] (local ids; others left out) -> sum over k of
    expert(score * x), [T, H]. gate_up [E, H, 2I], down [E, I, H]: this process's experts
    (packed: the same, packed for oneDNN)."""
    rows, token_of, counts = route(x, expert_ids, scores, gate_up.shape[0])
    y = grouped_swiglu(rows, counts, gate_up, down, packed=packed)
    return torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))


class PackedExperts:
    """Every expert's gate_up and down weights packed once for oneDNN (CPU; see
    herd/model/cpu_linear.py), and the expert loop over them. Costs a second copy of the
    expert weights (the plain ones stay for loading, sharding and the other paths)."""

    def __init__(self, gate_up: list[PackedLinear], down: list[PackedLinear], intermediate: int, hidden: int, dtype):
        self.gate_up = gate_up
        self.down = down
        self.intermediate = intermediate
        self.hidden = hidden
        self.dtype = dtype

    @classmethod
    def pack(cls, gate_up: torch.Tensor, down: torch.Tensor, rows_hint: int) -> PackedExperts | None:
        """gate_up [E, H, 2I], down [E, I, H] -> packed, or None where packing does not apply."""
        packed_gate_up, packed_down = [], []
        for e in range(gate_up.shape[0]):
            # A linear weight is [out, in]: the transposes of the checkpoint's [in, out] experts.
            gu = prepack(gate_up[e].t().contiguous(), None, rows_hint)
            d = prepack(down[e].t().contiguous(), None, rows_hint)
            if gu is None or d is None:
                return None
            packed_gate_up.append(gu)
            packed_down.append(d)
        return cls(packed_gate_up, packed_down, down.shape[1], down.shape[2], down.dtype)

    def swiglu(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """As grouped_swiglu: rows sorted by expert, counts per expert. Only experts with rows
        run; their rows are padded to a bucket size so that oneDNN meets few matmul shapes (it
        builds a kernel for each new one: about 0.7 ms)."""
        inter = self.intermediate
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            x = rows[start : start + n]
            start += n
            padded = _bucket(n)
            if padded != n:
                x = F.pad(x, (0, 0, 0, padded - n))
            gate_up = self.gate_up[e](x)
            y = self.down[e](F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
            outs.append(y if padded == n else y[:n])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def warm_up(self, max_rows: int) -> None:
        """Builds oneDNN's kernel for every bucket size once, at start-up (all experts share them)."""
        for n in bucket_values(max_rows):
            self.swiglu(torch.zeros(n, self.hidden, dtype=self.dtype), [n])


def _bucket(n: int) -> int:
    """bucket_sizes for one count, on the host."""
    if n <= 8:
        return n
    step = max(1 << (n.bit_length() - 1) >> 2, 1)
    return -(-n // step) * step


def bucket_values(limit: int) -> list[int]:
    """Every bucket size up to `limit` (see bucket_sizes)."""
    return sorted(set(bucket_sizes(torch.arange(1, limit + 1)).tolist()))


@torch.inference_mode()
def warm_up(gate_up: torch.Tensor, down: torch.Tensor, max_rows: int = 512, max_capacity: int = 64) -> None:
    """Runs the CPU matmul shapes the experts will meet once each, at start-up: oneDNN builds a
    kernel per new shape (1-2 ms each in bf16), a cost that otherwise lands on the first requests
    of every new size. Every MoE layer of a model has the same shapes: warm one."""
    if gate_up.is_cuda or gate_up.dtype == torch.float32:
        return  # CUDA kernels need no per-shape build; float32 (MKL) builds cheaply
    num_experts, hidden, _ = gate_up.shape
    for rows in bucket_values(max_rows):  # one expert's group in the grouped walk / the loop
        x = gate_up.new_zeros(rows, hidden)
        _swiglu(x, gate_up[0], down[0], None)
    for capacity in bucket_values(max_capacity):  # every expert padded alike: one bmm
        x = gate_up.new_zeros(num_experts, capacity, hidden)
        gate, up = torch.bmm(x, gate_up).chunk(2, dim=-1)
        torch.bmm(up * F.silu(gate), down)


def grouped_mm_works(device: torch.device) -> bool:
    key = str(device)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = probe_grouped_mm(device)
    return _GROUPED_MM_OK[key]


def probe_grouped_mm(device: torch.device) -> bool:
    """Whether torch._grouped_mm runs on `device` in bf16 and agrees with the per-expert loop
    (it needs a recent GPU: sm90+ in current PyTorch builds)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        e, h, i = 4, 64, 32
        gate_up = (torch.randn(e, h, 2 * i, generator=g) / 8).to(device, torch.bfloat16)
        down = (torch.randn(e, i, h, generator=g) / 8).to(device, torch.bfloat16)
        counts = torch.tensor([3, 0, 8, 5], device=device)
        rows = torch.randn(16, h, generator=g).to(device, torch.bfloat16)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gate, up = torch._grouped_mm(rows, gate_up, offs=offs).chunk(2, dim=-1)
        got = torch._grouped_mm(up * F.silu(gate), down, offs=offs)
        ref = swiglu_loop(rows, counts.tolist(), gate_up, down)
        ok = bool(torch.allclose(got.float(), ref.float(), rtol=2e-2, atol=2e-2))
    except Exception as exc:  # not built for this device
        log.info("torch._grouped_mm unavailable on %s (%s): experts use padded batched matmuls", device, exc)
        return False
    log.info("routed experts on %s: torch._grouped_mm %s", device, "verified" if ok else "disagrees, not used")
    return ok
