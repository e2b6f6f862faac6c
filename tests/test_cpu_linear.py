"""Linear layers with oneDNN-packed weights compute what F.linear computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from herd.model.cpu_linear import available, prepack, prepack_linears

pytestmark = pytest.mark.skipif(not available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_is_linear(dtype, rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 40, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(prepack(w, b, rows_hint=16)(x), F.linear(x, w, b), rtol=tol, atol=tol)
    torch.testing.assert_close(prepack(w)(x[None]), F.linear(x, w)[None], rtol=tol, atol=tol)  # [..., in]


def test_prepack_linears_keeps_hooks_and_skips_other_modules():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False), nn.Embedding(5, 8))
    x = torch.randn(3, 8)
    ref = model[2](model[1](model[0](x)))
    model[2].register_forward_hook(lambda m, i, o: o * 2)
    assert prepack_linears(model) == 2
    torch.testing.assert_close(model[2](model[1](model[0](x))), 2 * ref, rtol=1e-5, atol=1e-5)
    assert prepack(torch.randn(4, 4, dtype=torch.float16)) is None  # not a packable dtype
