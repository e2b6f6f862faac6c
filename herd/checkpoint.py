"""Loads the text decoder's weights from a Hugging Face-format Llama 4 checkpoint.

Tensors are streamed one at a time out of memory-mapped safetensors shards straight into the
model's preallocated parameters, so loading never holds a second copy of the weights. Both key
layouts are read: `language_model.model.*` (Llama4ForConditionalGeneration) and `model.*`
(Llama4ForCausalLM); experts either fused (`experts.gate_up_proj`, `experts.down_proj`) or per
expert (`experts.{e}.{gate,up,down}_proj.weight`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from herd.config import ModelConfig
from herd.model.llama4 import Llama4TextModel


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt or does not match its config."""


# Text-model prefixes, longest first. The vision tower and projector are handled elsewhere.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
_LM_HEAD_KEYS = ("language_model.lm_head.weight", "lm_head.weight")
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")
_PER_EXPERT = re.compile(r"^(layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def shard_files(model_dir: str | Path) -> dict[str, Path]:
    """Maps every tensor name to the safetensors file holding it."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = {name: model_dir / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"shard {file.name} named in {index.name} is missing")
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no safetensors weights found in {model_dir}")
    files = {}
    for shard in shards:
        for name in _open(shard).keys():
            files[name] = shard
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path.name}: {e}") from None


def text_name(checkpoint_name: str) -> str | None:
    """The herd parameter name for a checkpoint tensor; None for vision/projector tensors."""
    if checkpoint_name in _LM_HEAD_KEYS:
        return "lm_head.weight"
    if checkpoint_name.startswith(_VISION_PREFIXES):
        return None
    for prefix in _TEXT_PREFIXES:
        if checkpoint_name.startswith(prefix):
            return checkpoint_name[len(prefix) :]
    return checkpoint_name


def build_text_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> Llama4TextModel:
    """An uninitialised model: parameters are allocated but hold garbage until loaded."""
    with torch.device("meta"):
        model = Llama4TextModel(config.text).to(dtype)
    return model.to_empty(device=device)


def load_text_model(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Llama4TextModel:
    if config.quantization:
        method = config.quantization.get("quant_method", "unknown")
        raise CheckpointError(f"quantized checkpoints ({method!r}) are not supported yet")
    model = build_text_model(config, dtype, device)
    load_text_weights(model, model_dir)
    return model.eval()


@torch.no_grad()
def load_text_weights(model: Llama4TextModel, model_dir: str | Path) -> None:
    params = dict(model.named_parameters())
    expected = set(params)
    # Per-expert tensors fill slices of the fused parameters: track each slice separately.
    for name, p in params.items():
        if name.endswith("experts.gate_up_proj"):
            expected.remove(name)
            base = name.removesuffix(".gate_up_proj")
            expected |= {f"{base}.{e}.{part}" for e in range(p.shape[0]) for part in ("gate", "up")}
        elif name.endswith("experts.down_proj"):
            expected.remove(name)
            base = name.removesuffix(".down_proj")
            expected |= {f"{base}.{e}.down" for e in range(p.shape[0])}
    loaded: set[str] = set()

    by_file: dict[Path, list[str]] = {}
    for name, file in shard_files(model_dir).items():
        by_file.setdefault(file, []).append(name)

    for file, names in sorted(by_file.items()):
        handle = _open(file)
        available = set(handle.keys())
        for ckpt_name in sorted(names):
            if ckpt_name not in available:
                raise CheckpointError(f"tensor {ckpt_name} is listed in the index but missing from {file.name}")
            name = text_name(ckpt_name)
            if name is None:
                continue  # vision tower / projector: loaded by the vision model
            try:
                tensor = handle.get_tensor(ckpt_name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {ckpt_name} from {file.name}: {e}") from None
            loaded |= _assign(params, name, ckpt_name, tensor)

    missing = expected - loaded
    if model.lm_head is not None and "lm_head.weight" in missing and model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")


def _assign(params: dict[str, torch.nn.Parameter], name: str, ckpt_name: str, tensor: torch.Tensor) -> set[str]:
    """Copies one checkpoint tensor into its parameter (or a slice of it); returns what it filled."""
    per_expert = _PER_EXPERT.match(name)
    if per_expert:
        base, expert, part = per_expert.group(1), int(per_expert.group(2)), per_expert.group(3)
        fused = params.get(f"{base}.down_proj" if part == "down" else f"{base}.gate_up_proj")
        if fused is None or expert >= fused.shape[0]:
            raise CheckpointError(f"unexpected tensor {ckpt_name}: the config has no such expert")
        # Per-expert linear weights are [out, in]; the fused layout stores [in, out].
        if part == "down":
            target = fused[expert]
        else:
            inter = fused.shape[2] // 2
            target = fused[expert, :, :inter] if part == "gate" else fused[expert, :, inter:]
        _check_shape(ckpt_name, tuple(tensor.shape), tuple(target.shape[::-1]))
        target.copy_(tensor.T)
        return {f"{base}.{expert}.{part}"}

    param = params.get(name)
    if param is None:
        raise CheckpointError(f"unexpected tensor {ckpt_name}: the model has no parameter {name}")
    _check_shape(ckpt_name, tuple(tensor.shape), tuple(param.shape))
    param.copy_(tensor)
    if name.endswith("experts.gate_up_proj"):
        base = name.removesuffix(".gate_up_proj")
        return {f"{base}.{e}.{part}" for e in range(param.shape[0]) for part in ("gate", "up")}
    if name.endswith("experts.down_proj"):
        base = name.removesuffix(".down_proj")
        return {f"{base}.{e}.down" for e in range(param.shape[0])}
    return {name}


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise CheckpointError(f"tensor {name} has shape {list(got)}, the config expects {list(want)}")
