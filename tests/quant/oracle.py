"""The reference for FP8 checkpoints: transformers + compressed-tensors on the CPU.

transformers decompresses a compressed-tensors FP8 checkpoint (w = q * scale) and drops the
quantization scheme, so two things are put back here, both with compressed-tensors' own
functions:
- the weights are decompressed again in float32 (`dequantize` with the scale widened to
  float32). transformers computes q * scale in the scale's dtype, bf16, which rounds every
  weight (2^-9 relative); on these tiny random MoE models that flips near-tied router choices
  and moves logits by up to 0.3, while q * scale itself is exact in float32 and is what an FP8
  GEMM (and herd) multiplies by.
- the dynamic per-token input quantization the config asks for (`compute_dynamic_scales_and_zp`
  + `fake_quantize`, what its quantized Linear forward calls), as a pre-hook on every module
  whose checkpoint weight is FP8.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def fp8_modules_in(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    out = set()
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                if k.endswith(".weight") and f.get_slice(k).get_dtype() == "F8_E4M3":
                    out.add(k.removesuffix(".weight"))
    return out


def load_reference(model_dir: Path, dtype=torch.float32):
    """The Llama4ForCausalLM part of a (multimodal) FP8 checkpoint, W8A8 as its config says."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize
    from safetensors import safe_open
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    model_dir = Path(model_dir)
    hf = AutoModelForImageTextToText.from_pretrained(
        model_dir, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    hf = hf.to(dtype).eval()
    qcfg = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    (group,) = qcfg["config_groups"].values()
    args = QuantizationArgs(**group["input_activations"])
    weight_args = QuantizationArgs(**group["weights"])

    def hook(module, inputs):
        (x,) = inputs
        # compressed-tensors' "token" strategy keeps dims 0 and 1: on the 2-D [tokens, hidden]
        # inputs transformers' MoE feeds the experts it would reduce over the whole tensor (one
        # scale for all tokens). Per token is what the scheme means (and what vLLM and herd
        # do), so 2-D inputs get a leading batch dim first.
        x3 = x if x.dim() == 3 else x[None]
        scale, zp = compute_dynamic_scales_and_zp(value=x3, args=args, module=module)
        return (fake_quantize(x=x3, scale=scale, zero_point=zp, args=args).reshape(x.shape),)

    wanted = fp8_modules_in(model_dir)
    exact = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for module in wanted & {k.removesuffix(".weight") for k in f.keys()}:
                q, scale = f.get_tensor(f"{module}.weight"), f.get_tensor(f"{module}.weight_scale")
                exact[module] = dequantize(x_q=q, scale=scale.float(), args=weight_args, dtype=torch.float32)
    hooked = set()
    for name, module in hf.named_modules():
        # transformers names the text model `model.language_model.*` or `language_model.model.*`
        # depending on version; checkpoint names use the latter.
        alias = name.replace("model.language_model.", "language_model.model.")
        key = alias if alias in wanted else name
        if key in wanted:
            module.weight.data = exact[key].to(dtype)
            module.register_forward_pre_hook(hook)
            hooked.add(key)
    assert hooked == wanted, f"modules not found in transformers' model: {sorted(wanted - hooked)[:5]}"
    return hf.language_model if hasattr(hf, "language_model") else hf
