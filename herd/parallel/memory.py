"""Weight memory per rank, computed from the config alone (the model is built on the meta
device, sharded as a rank would hold it, and its parameters counted): for `herd plan`."""

from __future__ import annotations

import torch

from herd.config import ModelConfig
from herd.parallel.sizes import Shard


def text_weight_bytes(config: ModelConfig, shard: Shard, dtype: torch.dtype, quantization: str | None) -> int:
    """Bytes of one rank's text-model weights: `dtype` for what stays high precision, 1 byte per
    FP8 weight plus its float32 row scales for what `quantization` makes FP8 (an FP8
    checkpoint's own config, or "fp8" / "fp8-all" on a bf16 one)."""
    from herd.checkpoint import build_text_model
    from herd.model.llama4 import Llama4TextModel
    from herd.model.quant import FP8Policy, convert_to_fp8, policy_modules, resolve_policy

    with torch.device("meta"):
        policy = resolve_policy(quantization)
        if config.quantization and policy is None:
            policy = FP8Policy("checkpoint", tuple(config.quantization.get("ignore") or ()))
        fp8 = policy_modules(Llama4TextModel(config.text), policy) if policy is not None else set()
        model = build_text_model(config, dtype, "meta", None, _MetaRank(shard) if shard.is_parallel else None)
        if fp8:
            convert_to_fp8(model, fp8)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def vision_weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """The vision tower and projector, replicated on every rank (it is small)."""
    if not (config.is_multimodal and config.vision):
        return 0
    from herd.model.vision import Llama4VisionEncoder, VisionConfig

    with torch.device("meta"):
        model = Llama4VisionEncoder(VisionConfig.from_model_config(config)).to(dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


class _MetaRank:
    """A rank without a process group: enough to build shapes, never to run."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.group = None
