"""Decode attention (one query token per sequence, padded keys) against PyTorch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

from herd.model import attention
from herd.model.attention import decode_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocked", [False, True])
def test_decode_attention_is_sdpa(dtype, blocked, monkeypatch):
    if blocked:  # the long-context fallback: SDPA itself
        monkeypatch.setattr(attention, "DECODE_SCORES_LIMIT", 0)
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, length, d = 5, 8, 2, 37, 16
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k = torch.randn(b, length, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, length, hkv, d, generator=g).to(dtype)
    lengths = torch.tensor([1, 5, 37, 20, 36])
    valid = torch.arange(length)[None, :] < lengths[:, None]
    k[~valid] = 1e4  # padding must not leak into the result
    ref = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=0.25, enable_gqa=True,
    ).squeeze(2)
    got = decode_attention(q, k.transpose(1, 2), v.transpose(1, 2), valid, 0.25)  # [B, Hkv, L, D]
    assert got.dtype == dtype and got.shape == (b, hq, d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
