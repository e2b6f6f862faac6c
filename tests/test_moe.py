"""Grouped routed experts (herd/model/moe.py) against the per-expert loop they replace."""

import pytest
import torch

from herd.model import moe
from herd.model.moe import bucket_sizes, grouped_swiglu, route, routed_experts, swiglu_loop


def _weights(experts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(experts, hidden, 2 * inter, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, inter, hidden, generator=g) / inter**0.5).to(dtype)
    return gate_up, down


def _reference(x, ids, scores, gate_up, down):
    """The layer as herd computed it before grouped GEMMs: one expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if 0 <= e < gate_up.shape[0]:
                out[t] += swiglu_loop((x[t] * scores[t, k])[None], [1], gate_up[e : e + 1], down[e : e + 1])[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,top_k,experts,skew",
    [
        (1, 1, 16, False),  # a few experts with rows: each runs on its own
        (3, 1, 16, False),
        (40, 1, 16, False),  # bf16: one bmm over all experts padded alike
        (40, 2, 16, True),  # skewed routing: per-expert buckets, torch._grouped_mm
        (200, 1, 16, False),
    ],
)
def test_grouped_matches_the_per_expert_loop(dtype, tokens, top_k, experts, skew):
    hidden, inter = 32, 24
    gate_up, down = _weights(experts, hidden, inter, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    if skew:  # half the pairs go to expert 3: uneven groups, some experts empty
        ids = torch.where(torch.rand(tokens, top_k, generator=g) < 0.5, 3, torch.randint(0, experts, (tokens, top_k), generator=g))
    else:
        ids = torch.randint(0, experts, (tokens, top_k), generator=g)
    scores = torch.rand(tokens, top_k, generator=g).to(dtype)
    rows, _, counts = route(x, ids, scores, experts)
    loop = swiglu_loop(rows, counts.tolist(), gate_up, down)
    grouped = grouped_swiglu(rows, counts, gate_up, down)
    # The same matmuls per row, only batched: equal up to the kernels' accumulation order.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=tol, atol=tol)
    got = routed_experts(x, ids, scores, gate_up, down)
    torch.testing.assert_close(got.float(), _reference(x, ids, scores, gate_up, down).float(), rtol=tol, atol=tol)


def test_every_cpu_strategy_is_exercised_and_agrees(monkeypatch):
    """Force each CPU path on the same input: uniform bmm, bucketed grouped walk, small loop."""
    gate_up, down = _weights(8, 16, 8, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 16, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 8, (24, 1), generator=g)
    rows, _, counts = route(x, ids, torch.ones(24, 1, dtype=torch.bfloat16), 8)
    ref = swiglu_loop(rows, counts.tolist(), gate_up, down).float()
    for limit, few in ((1000, 0), (0, 0), (0, 1000)):
        monkeypatch.setattr(moe, "UNIFORM_PAD_LIMIT", limit)
        monkeypatch.setattr(moe, "FEW_ACTIVE_EXPERTS", few)
        torch.testing.assert_close(grouped_swiglu(rows, counts, gate_up, down).float(), ref, rtol=2e-2, atol=2e-2)


def test_pairs_of_other_ranks_experts_are_left_out():
    """Expert parallelism: ids outside this rank's [0, E) (e.g. -1) contribute nothing."""
    gate_up, down = _weights(4, 16, 8, torch.float32)
    x = torch.randn(6, 16)
    ids = torch.tensor([[0, -1], [5, 1], [-1, -1], [3, 2], [1, 1], [4, 0]])
    scores = torch.rand(6, 2)
    got = routed_experts(x, ids, scores, gate_up, down)
    torch.testing.assert_close(got, _reference(x, ids, scores, gate_up, down), rtol=1e-5, atol=1e-5)
    assert got[2].abs().max() == 0


def test_bucket_sizes_are_few_and_pad_little():
    counts = torch.arange(0, 4097)
    sizes = bucket_sizes(counts)
    assert sizes[0] == 0 and (sizes[1:9] == counts[1:9]).all()
    assert (sizes >= counts).all() and (sizes[1:] <= 1.25 * counts[1:] + 1).all()
    assert len(set(sizes.tolist())) <= 50


def test_warm_up_runs_every_bucket_shape_once(monkeypatch):
    """bf16 on CPU: each bucket size of one expert's group and of the all-experts bmm, once."""
    gate_up, down = _weights(4, 16, 8, torch.bfloat16)
    seen = []
    real_bmm = torch.bmm
    monkeypatch.setattr(moe, "_swiglu", lambda x, gu, dn, q: seen.append(("mm", x.shape[0])))
    monkeypatch.setattr(torch, "bmm", lambda a, b: seen.append(("bmm", a.shape[1])) or real_bmm(a, b))
    moe.warm_up(gate_up, down, max_rows=20, max_capacity=10)
    assert [n for kind, n in seen if kind == "mm"] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20]
    assert [n for kind, n in seen if kind == "bmm"] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 10, 10]
    seen.clear()
    moe.warm_up(gate_up.float(), down.float())  # float32: nothing to build ahead
    assert seen == []
