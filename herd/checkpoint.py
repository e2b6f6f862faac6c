"""Loads the text decoder's weights from a Hugging Face-format Llama 4 checkpoint.

Tensors are streamed one at a time out of memory-mapped safetensors shards straight into the
model's preallocated parameters, so loading never holds a second copy of the weights. Both key
layouts are read: `language_model.model.*` (Llama4ForConditionalGeneration) and `model.*`
(Llama4ForCausalLM); experts either fused (`experts.gate_up_proj`, `experts.down_proj`) or per
expert (`experts.{e}.{gate,up,down}_proj.weight`).

FP8: compressed-tensors checkpoints (Meta's Llama 4 FP8 release) keep their E4M3 weights and
per-row scales as they are, 1 byte per weight; which modules are FP8 is read off the tensors
themselves (an F8 weight with a `weight_scale`). A bf16 checkpoint loaded with
`quantization="fp8"` is quantized here, one tensor (one expert) at a time.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from herd.config import ModelConfig
from herd.model.llama4 import Llama4TextModel, RoutedExperts
from herd.model.quant import (
    FP8_DTYPE,
    NEVER_FP8,
    FP8Policy,
    Fp8Linear,
    Fp8RoutedExperts,
    convert_to_fp8,
    describe,
    fp8_backend,
    matches_any,
    policy_modules,
    probe_grouped,
    quantize_rowwise,
    resolve_policy,
)

log = logging.getLogger("herd.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, corrupt or does not match its config."""


# Text-model prefixes, longest first. The vision tower and projector are handled elsewhere.
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
_LM_HEAD_KEYS = ("language_model.lm_head.weight", "lm_head.weight")
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")
_PER_EXPERT = re.compile(r"^(layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.(weight|weight_scale)$")
_FUSED = re.compile(r"^(layers\.\d+\.feed_forward\.experts)\.(gate_up|down)_proj(_scale)?$")


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


# -- quantization config ----------------------------------------------------------------------
_FP8_WEIGHTS = {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True}
_FP8_TOKENS = {"type": "float", "num_bits": 8, "strategy": "token", "symmetric": True, "dynamic": True}
_SUPPORTED = "compressed-tensors FP8 E4M3 with per-channel weights and dynamic per-token activations (FP8_DYNAMIC)"


def _unsupported(found: str) -> CheckpointError:
    return CheckpointError(f"unsupported quantization: {found}; herd loads {_SUPPORTED}")


def fp8_ignore_list(quantization: dict) -> list[str]:
    """Validates a checkpoint's `quantization_config`; returns its `ignore` list.

    Anything but FP8_DYNAMIC (another method, int weights, static or per-tensor activation
    scales, group/block strategies, a KV cache scheme, sparsity) is refused with what was found.
    """
    method = quantization.get("quant_method", "unknown")
    if method != "compressed-tensors":
        raise _unsupported(f"quant_method {method!r}")
    groups = quantization.get("config_groups") or {}
    if not groups:
        raise _unsupported("compressed-tensors config without config_groups")
    for gname, group in groups.items():
        fmt = group.get("format") or quantization.get("format")
        if fmt != "float-quantized":
            raise _unsupported(f"group {gname!r} in format {fmt!r}")
        weights = group.get("weights") or {}
        acts = group.get("input_activations")
        for what, args, want in (("weights", weights, _FP8_WEIGHTS), ("input_activations", acts, _FP8_TOKENS)):
            if not args:
                raise _unsupported(f"group {gname!r} has no {what} quantization (weight-only FP8 is not supported)")
            got = {k: args.get(k) for k in want}
            if got != want or args.get("group_size") or args.get("block_structure"):
                shown = {k: args.get(k) for k in ("type", "num_bits", "strategy", "symmetric", "dynamic", "group_size")}
                raise _unsupported(f"group {gname!r} {what} {shown}")
        if weights.get("dynamic"):
            raise _unsupported(f"group {gname!r} with dynamic weights")
        if group.get("output_activations"):
            raise _unsupported(f"group {gname!r} quantizes output activations")
    if quantization.get("kv_cache_scheme"):
        raise _unsupported(f"kv_cache_scheme {quantization['kv_cache_scheme']}")
    for key in ("sparsity_config", "transform_config"):
        if quantization.get(key):
            raise _unsupported(f"{key} {quantization[key]}")
    return list(quantization.get("ignore") or [])


def _dtype_of(handle, name: str) -> str:
    return handle.get_slice(name).get_dtype()


def scan_fp8_modules(files: dict[str, Path], ignore: list[str]) -> set[str]:
    """Herd module names whose checkpoint weights are FP8 (an F8_E4M3 weight with a scale).

    Reads only the shard headers. A module in `ignore` that is FP8 anyway, an FP8 weight without
    its scale, an FP8 router/lm_head/embedding, or a layer whose experts are only partly FP8 are
    errors: the checkpoint would then not be what its config says.
    """
    handles: dict[Path, object] = {}
    names = set(files)
    fp8: set[str] = set()
    expert_parts: dict[str, set[str]] = {}
    for ckpt_name, file in files.items():
        name = text_name(ckpt_name)
        if name is None or not (ckpt_name.endswith(".weight") or _FUSED.match(name or "")):
            continue
        handle = handles.get(file) or handles.setdefault(file, _open(file))
        if _dtype_of(handle, ckpt_name) != "F8_E4M3":
            continue
        module = ckpt_name.removesuffix(".weight")
        scale = f"{module}.weight_scale" if ckpt_name.endswith(".weight") else f"{ckpt_name}_scale"
        if scale not in names:
            raise CheckpointError(f"FP8 tensor {ckpt_name} has no scale ({scale})")
        if matches_any(module, ignore):
            raise CheckpointError(f"{module} is FP8 but the quantization config's ignore list names it")
        per_expert = _PER_EXPERT.match(name)
        fused = _FUSED.match(name)
        if per_expert:
            base = per_expert.group(1)
            expert_parts.setdefault(base, set()).add(f"{per_expert.group(2)}.{per_expert.group(3)}")
            fp8.add(base)
        elif fused:
            expert_parts.setdefault(fused.group(1), set()).add(f"fused.{fused.group(2)}")
            fp8.add(fused.group(1))
        else:
            herd_module = name.removesuffix(".weight")
            if NEVER_FP8.search(herd_module):
                raise _unsupported(f"FP8 {module} (herd keeps the router, embeddings and lm_head in bf16)")
            fp8.add(herd_module)
    for base, parts in expert_parts.items():
        per_expert = {p for p in parts if not p.startswith("fused.")}
        fused = parts - per_expert
        if per_expert and len(per_expert) % 3 == 0:
            experts = {p.split(".")[0] for p in per_expert}
            complete = len(per_expert) == 3 * len(experts)
        else:
            complete = not per_expert
        if (fused and fused != {"fused.gate_up", "fused.down"}) or not complete:
            raise CheckpointError(f"{base}: only some expert weights are FP8; herd needs a layer's experts alike")
    return fp8


# -- building and loading -----------------------------------------------------------------------
def build_text_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    fp8_modules: set[str] | None = None,
    parallel=None,
) -> Llama4TextModel:
    """An uninitialised model: parameters are allocated but hold garbage until loaded.

    `fp8_modules` (herd module names) become FP8 modules before anything is allocated, so their
    weights take 1 byte each from the start. `parallel` (a herd.parallel.Rank) builds this
    rank's shard of the model instead of the whole.
    """
    with torch.device("meta"):
        if parallel is None:
            model = Llama4TextModel(config.text).to(dtype)
        else:
            from herd.parallel.layers import ShardedLlama4TextModel

            model = ShardedLlama4TextModel(config.text, parallel.shard, parallel.group).to(dtype)
    if fp8_modules:
        convert_to_fp8(model, fp8_modules, fp8_backend(device))
    return model.to_empty(device=device)


def load_text_model(
    model_dir: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    quantization: str | FP8Policy | None = None,
    parallel=None,
) -> Llama4TextModel:
    """Builds and loads the text model (`parallel`: only this rank's shard, see herd.parallel). `quantization` ("fp8": Meta's policy, routed experts
    only; "fp8-all": every Linear but router and lm_head; or an FP8Policy) quantizes a bf16
    checkpoint while loading; an FP8 checkpoint keeps its own choice of FP8 modules."""
    policy = resolve_policy(quantization)
    files = shard_files(model_dir)
    if config.quantization:
        ignore = fp8_ignore_list(config.quantization)
        fp8 = scan_fp8_modules(files, ignore)
        if policy is not None:
            log.info("the checkpoint is already FP8: quantization=%r leaves its choice of modules", policy.name)
    elif policy is not None:
        with torch.device("meta"):
            fp8 = policy_modules(Llama4TextModel(config.text), policy)
    else:
        fp8 = set()
    model = build_text_model(config, dtype, device, fp8, parallel)
    plan = None
    if parallel is not None:
        from herd.parallel.loading import ShardPlan

        plan = ShardPlan(config.text, parallel.shard)
    load_text_weights(model, model_dir, files, plan)
    if parallel is not None:
        model.after_load()
    if fp8 and torch.device(device).type == "cuda":
        grouped = probe_grouped(torch.device(device)) if fp8_backend(device) == "scaled_mm" else False
        for m in model.modules():
            if isinstance(m, Fp8RoutedExperts):
                m.grouped = grouped
    model.weights_summary = describe(model)
    if fp8:
        log.info(model.weights_summary)
    return model.eval()


def _expected_keys(model: Llama4TextModel) -> set[str]:
    """What the checkpoint must fill: parameter names, with each routed-experts block split into
    per-expert pieces (`{base}.{e}.gate`, and `{base}.{e}.gate.scale` when FP8) so that per-expert
    and fused checkpoints are checked alike."""
    expected = set()
    expert_blocks = {}
    for name, m in model.named_modules():
        if isinstance(m, (RoutedExperts, Fp8RoutedExperts)):
            expert_blocks[name] = m
            suffixes = ("",) if isinstance(m, RoutedExperts) else ("", ".scale")
            expected |= {
                f"{name}.{e}.{part}{s}" for e in range(m.num_experts) for part in ("gate", "up", "down") for s in suffixes
            }
    for name, _ in model.named_parameters():
        if name.rpartition(".")[0] not in expert_blocks:
            expected.add(name)
    return expected


@torch.no_grad()
def load_text_weights(
    model: Llama4TextModel, model_dir: str | Path, files: dict[str, Path] | None = None, plan=None
) -> None:
    """Fills the model from the checkpoint; with a herd.parallel ShardPlan, only the rows and
    experts this rank holds are read."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected = _expected_keys(model)
    loaded: set[str] = set()

    by_file: dict[Path, list[str]] = {}
    for name, file in (files or shard_files(model_dir)).items():
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
            reader = _Reader(handle, ckpt_name, file)
            if plan is not None:
                local = plan.local_name(name)
                if local is None:
                    continue  # an expert another rank holds
                name, reader = local, plan.reader(handle, ckpt_name, file, name)
            loaded |= _assign(params, modules, name, reader)

    missing = expected - loaded
    if model.lm_head is not None and "lm_head.weight" in missing and model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")


class _Reader:
    """One checkpoint tensor, read whole or one expert (leading index) at a time."""

    def __init__(self, handle, name: str, file: Path):
        self.handle, self.name, self.file = handle, name, file

    @property
    def is_fp8(self) -> bool:
        return _dtype_of(self.handle, self.name) == "F8_E4M3"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(self.name).get_shape())

    def __call__(self) -> torch.Tensor:
        try:
            return self.handle.get_tensor(self.name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {self.name} from {self.file.name}: {e}") from None

    def expert(self, e: int) -> torch.Tensor:
        try:
            return self.handle.get_slice(self.name)[e]
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {self.name} from {self.file.name}: {err}") from None


def _assign(params: dict[str, torch.nn.Parameter], modules: dict, name: str, read: _Reader) -> set[str]:
    """Copies one checkpoint tensor into its parameter (or a slice of it), quantizing a bf16
    tensor bound for an FP8 module; returns the expected keys it filled."""
    ckpt_name = read.name
    per_expert = _PER_EXPERT.match(name)
    if per_expert:
        base, expert, part, kind = per_expert.group(1), int(per_expert.group(2)), per_expert.group(3), per_expert.group(4)
        block = modules.get(base)
        if not isinstance(block, (RoutedExperts, Fp8RoutedExperts)) or expert >= block.num_experts:
            raise CheckpointError(f"unexpected tensor {ckpt_name}: the config has no such expert")
        key = f"{base}.{expert}.{part}"
        if isinstance(block, RoutedExperts):
            if kind == "weight_scale" or read.is_fp8:
                raise CheckpointError(f"unexpected FP8 tensor {ckpt_name} for a bf16 expert")
            tensor = read()
            # Per-expert linear weights are [out, in]; the fused layout stores [in, out].
            if part == "down":
                target = block.down_proj[expert]
            else:
                inter = block.gate_up_proj.shape[2] // 2
                target = block.gate_up_proj[expert, :, :inter] if part == "gate" else block.gate_up_proj[expert, :, inter:]
            _check_shape(ckpt_name, tuple(tensor.shape), tuple(target.shape[::-1]))
            target.copy_(tensor.T)
            return {key}
        inter = block.intermediate
        rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "down": slice(None)}[part]
        weight, scale = (block.down_weight, block.down_scale) if part == "down" else (block.gate_up_weight, block.gate_up_scale)
        target_w, target_s = weight[expert, rows], scale[expert, rows]
        if kind == "weight_scale":
            _fill_scale(target_s, read)
            return {f"{key}.scale"}
        return _fill_weight(target_w, target_s, read, key, f"{key}.scale")

    fused = _FUSED.match(name)
    if fused and isinstance(modules.get(fused.group(1)), Fp8RoutedExperts):
        base, which, is_scale = fused.group(1), fused.group(2), fused.group(3)
        block = modules[base]
        parts = ("gate", "up") if which == "gate_up" else ("down",)
        weight, scale = (block.gate_up_weight, block.gate_up_scale) if which == "gate_up" else (block.down_weight, block.down_scale)
        keys = {f"{base}.{e}.{p}" for e in range(block.num_experts) for p in parts}
        if is_scale:
            _fill_scale(scale, read)
            return {f"{k}.scale" for k in keys}
        # Fused checkpoints store [experts, in, out]: transpose to herd's row layout.
        _check_shape(ckpt_name, read.shape, (weight.shape[0], weight.shape[2], weight.shape[1]))
        if read.is_fp8:
            weight.copy_(read().transpose(1, 2))
            return keys
        for e in range(block.num_experts):  # quantize-on-load, one expert at a time
            q, s = quantize_rowwise(read.expert(e).T)
            weight[e].copy_(q)
            scale[e].copy_(s[:, 0])
        return keys | {f"{k}.scale" for k in keys}

    module_name, _, leaf = name.rpartition(".")
    module = modules.get(module_name)
    if isinstance(module, Fp8Linear):
        if leaf == "weight":
            return _fill_weight(module.weight, module.weight_scale, read, name, f"{module_name}.weight_scale")
        if leaf == "weight_scale":
            _fill_scale(module.weight_scale, read)
            return {name}

    param = params.get(name)
    if param is None:
        raise CheckpointError(f"unexpected tensor {ckpt_name}: the model has no parameter {name}")
    if read.is_fp8:
        raise CheckpointError(f"unexpected FP8 tensor {ckpt_name} for a bf16 parameter")
    tensor = read()
    _check_shape(ckpt_name, tuple(tensor.shape), tuple(param.shape))
    param.copy_(tensor)
    if name.endswith("experts.gate_up_proj"):
        base = name.removesuffix(".gate_up_proj")
        return {f"{base}.{e}.{part}" for e in range(param.shape[0]) for part in ("gate", "up")}
    if name.endswith("experts.down_proj"):
        base = name.removesuffix(".down_proj")
        return {f"{base}.{e}.down" for e in range(param.shape[0])}
    return {name}


def _fill_weight(weight: torch.Tensor, scale: torch.Tensor, read: _Reader, key: str, scale_key: str) -> set[str]:
    """An FP8 weight [out, in] as stored, or a bf16 one quantized here (scale filled too)."""
    _check_shape(read.name, read.shape, tuple(weight.shape))
    if read.is_fp8:
        weight.copy_(read())
        return {key}
    q, s = quantize_rowwise(read())
    weight.copy_(q)
    scale.copy_(s[:, 0])
    return {key, scale_key}


def _fill_scale(scale: torch.Tensor, read: _Reader) -> None:
    """Per-row scales come as [out, 1] (compressed-tensors) or any shape with one per row."""
    tensor = read()
    if tensor.numel() != scale.numel():
        raise CheckpointError(f"tensor {read.name} has shape {list(tensor.shape)}, the config expects {scale.numel()} scales")
    scale.copy_(tensor.reshape(scale.shape))


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise CheckpointError(f"tensor {name} has shape {list(got)}, the config expects {list(want)}")
