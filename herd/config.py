"""Model configuration read from a checkpoint's config.json.

Published Llama 4 checkpoints and transformers 5's `save_pretrained` spell the same facts
differently (`rope_theta` + `rope_scaling` vs `rope_parameters`, `torch_dtype` vs `dtype`,
`attn_temperature_tuning` as an int, `no_rope_layers: []` meaning "use the default"). This module
reads every spelling into one plain dataclass so the rest of herd never looks at raw JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Architectures whose text decoder is the Llama 4 text model.
MULTIMODAL_ARCHITECTURES = {"Llama4ForConditionalGeneration"}
TEXT_ARCHITECTURES = {"Llama4ForCausalLM", "Llama4TextModel"}


class ConfigError(ValueError):
    """The checkpoint's config.json cannot describe a model herd can run."""


@dataclass
class RopeScaling:
    """llama3-style RoPE frequency scaling (Scout uses it; Maverick does not)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class TextConfig:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # routed and shared experts
    intermediate_size_mlp: int = 16384  # dense layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] = field(default_factory=list)
    use_qk_norm: bool = True
    # no_rope_layers[i] == 1 means layer i USES RoPE (and chunked attention); 0 means NoPE/global.
    no_rope_layers: list[int] = field(default_factory=list)
    # Explicit per-layer attention kinds ("chunked_attention" / "full_attention"), when given.
    layer_types: list[str] | None = None
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_chunked(self, layer: int) -> bool:
        """RoPE layers attend only within their chunk; NoPE layers attend globally."""
        if self.attention_chunk_size is None:
            return False
        if self.layer_types is not None:
            return self.layer_types[layer] == "chunked_attention"
        return self.uses_rope(layer)

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers


@dataclass
class ModelConfig:
    text: TextConfig
    architecture: str
    vision: dict[str, Any] | None = None  # raw vision_config, used by the vision tower
    image_token_id: int | None = None
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    dtype: str = "bfloat16"  # the dtype the weights were saved in
    quantization: dict[str, Any] | None = None  # raw quantization_config, if any
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def is_multimodal(self) -> bool:
        return self.architecture in MULTIMODAL_ARCHITECTURES


def _as_int_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope_from(text: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads both `rope_theta` + `rope_scaling` (published) and `rope_parameters` (transformers 5)."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", 500000.0))
    source = params if params.get("rope_type", params.get("type")) not in (None, "default") else scaling
    rope_type = source.get("rope_type", source.get("type", "default")) if source else "default"
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"unsupported rope type {rope_type!r} (herd supports default and llama3)")
    try:
        return float(theta), RopeScaling(
            factor=float(source["factor"]),
            low_freq_factor=float(source["low_freq_factor"]),
            high_freq_factor=float(source["high_freq_factor"]),
            original_max_position_embeddings=int(source["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"llama3 rope scaling is missing {e.args[0]!r}") from None


def parse_text_config(text: dict[str, Any]) -> TextConfig:
    defaults = TextConfig()
    get = lambda key: text.get(key, getattr(defaults, key))  # noqa: E731
    n_layers = int(get("num_hidden_layers"))
    n_heads = int(get("num_attention_heads"))
    head_dim = text.get("head_dim") or int(get("hidden_size")) // n_heads

    # An empty or missing list means "the default": every `no_rope_layer_interval`-th layer is NoPE.
    no_rope_layers = _as_int_list(text.get("no_rope_layers"))
    if not no_rope_layers:
        interval = int(text.get("no_rope_layer_interval", 4))
        no_rope_layers = [int((i + 1) % interval != 0) for i in range(n_layers)]
    if len(no_rope_layers) < n_layers:
        raise ConfigError(f"no_rope_layers has {len(no_rope_layers)} entries for {n_layers} layers")

    moe_layers = text.get("moe_layers")
    if moe_layers is None:
        step = int(text.get("interleave_moe_layer_step", 1))
        moe_layers = list(range(step - 1, n_layers, step)) if step > 0 else []
    moe_layers = [int(i) for i in moe_layers]
    if any(not 0 <= i < n_layers for i in moe_layers):
        raise ConfigError(f"moe_layers {moe_layers} names a layer outside 0..{n_layers - 1}")

    layer_types = text.get("layer_types")
    if layer_types is not None and len(layer_types) < n_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries for {n_layers} layers")

    theta, scaling = _rope_from(text)
    hidden_act = str(get("hidden_act"))
    if hidden_act != "silu":
        raise ConfigError(f"unsupported hidden_act {hidden_act!r} (Llama 4 uses silu)")
    return TextConfig(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        intermediate_size_mlp=int(get("intermediate_size_mlp")),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        hidden_act=hidden_act,
        max_position_embeddings=int(get("max_position_embeddings")),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta,
        rope_scaling=scaling,
        num_local_experts=int(get("num_local_experts")),
        num_experts_per_tok=int(get("num_experts_per_tok")),
        moe_layers=moe_layers,
        use_qk_norm=bool(get("use_qk_norm")),
        no_rope_layers=no_rope_layers[:n_layers],
        layer_types=list(layer_types[:n_layers]) if layer_types is not None else None,
        attention_chunk_size=text.get("attention_chunk_size", defaults.attention_chunk_size),
        # Published configs sometimes say `4`: any truthy value turns tuning on.
        attn_temperature_tuning=bool(get("attn_temperature_tuning")),
        floor_scale=float(get("floor_scale")),
        attn_scale=float(get("attn_scale")),
        attention_bias=bool(get("attention_bias")),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        pad_token_id=text.get("pad_token_id"),
        bos_token_id=text.get("bos_token_id"),
        eos_token_id=_as_int_list(text.get("eos_token_id")),
    )


def _dtype_name(raw: dict[str, Any], text: dict[str, Any]) -> str:
    for source in (text, raw):
        for key in ("dtype", "torch_dtype"):
            if source.get(key):
                return str(source[key]).removeprefix("torch.")
    return "bfloat16"


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if "text_config" in raw or model_type == "llama4":
        text = dict(raw.get("text_config") or {})
        architecture = architectures[0] if architectures else "Llama4ForConditionalGeneration"
        # Outer-level token ids apply to the text model when the text config lacks them.
        for key in ("tie_word_embeddings",):
            if key not in text and key in raw:
                text[key] = raw[key]
    elif model_type == "llama4_text" or (model_type is None and set(architectures) & TEXT_ARCHITECTURES):
        text = raw
        architecture = architectures[0] if architectures else "Llama4ForCausalLM"
    else:
        raise ConfigError(f"not a Llama 4 config (model_type={model_type!r})")
    if architecture not in MULTIMODAL_ARCHITECTURES | TEXT_ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {architecture!r}")
    return ModelConfig(
        text=parse_text_config(text),
        architecture=architecture,
        vision=raw.get("vision_config"),
        image_token_id=raw.get("image_token_index", raw.get("image_token_id")),
        boi_token_id=raw.get("boi_token_index", raw.get("boi_token_id")),
        eoi_token_id=raw.get("eoi_token_index", raw.get("eoi_token_id")),
        dtype=_dtype_name(raw, text),
        quantization=raw.get("quantization_config") or text.get("quantization_config"),
        raw=raw,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {model_dir} a checkpoint directory?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return parse_config(raw)
