"""herd's FP8 quantizers against compressed-tensors' own, and the modules against plain math."""

import pytest
import torch

from herd.model.quant import (
    DEQUANT,
    FP8_DTYPE,
    Fp8Linear,
    fake_quantize_per_token,
    fp8_backend,
    quantize_per_token,
    quantize_rowwise,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rowwise_weights_match_compressed_tensors(dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    w = (torch.randn(48, 80) * torch.rand(48, 1) * 3).to(dtype)
    w[5] = 0  # a zero row gets the eps scale
    args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    ref = quantize(x=w, scale=scale, zero_point=zp, args=args, dtype=FP8_DTYPE)
    q, s = quantize_rowwise(w)
    assert torch.equal(s, scale)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))


def test_per_token_activations_match_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    x = torch.randn(1, 9, 64) * torch.rand(1, 9, 1) * 10
    args = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Identity())
    ref = fake_quantize(x=x, scale=scale, zero_point=zp, args=args)
    assert torch.equal(fake_quantize_per_token(x[0]), ref[0])
    q, s = quantize_per_token(x[0])
    assert q.dtype == FP8_DTYPE and s.shape == (9, 1) and s.dtype == torch.float32


def test_fp8_linear_is_w8a8():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    layer = Fp8Linear(64, 32)
    q, s = quantize_rowwise(w)
    layer.weight.data.copy_(q)
    layer.weight_scale.data.copy_(s[:, 0])
    x = torch.randn(2, 5, 64)
    xq, xs = quantize_per_token(x.reshape(-1, 64))
    ref = (xq.float() * xs) @ (q.float() * s).T
    assert layer.backend == DEQUANT == fp8_backend("cpu")
    assert (layer(x).reshape(-1, 32) - ref).abs().max().item() < 1e-5
    assert layer(x[:, :0]).shape == (2, 0, 32)
