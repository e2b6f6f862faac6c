"""Llama 4's vision tower: tiles of pixels -> features that replace the `<|patch|>` embeddings.

One tile (image_size x image_size, 336 px for the published models) goes through:
  patch embedding (non-overlapping patch_size patches, flattened, one linear layer, no bias)
  -> class token appended LAST -> learned positional embedding -> layernorm_pre
  -> encoder layers (pre-LN; bidirectional attention with a 2D rotary embedding; GELU MLP)
  -> layernorm_post -> drop the class token
  -> pixel shuffle (ratio 0.5: each 2x2 block of patches becomes one token, 4x the channels)
  -> adapter MLP (fc1, GELU, fc2, GELU; no biases)
  -> multi_modal_projector.linear_1 into the text hidden size.
For 336 px / 14 px patches that is 24 x 24 = 576 patches -> 144 tokens per tile.

Parameter names are the checkpoint's own (`vision_model.*`, `multi_modal_projector.*`), so loading is
a plain name match. Written from transformers' modeling_llama4.py (Llama4VisionModel and
Llama4MultiModalProjector) and checked against it in tests/vision/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ConfigError, ModelConfig
from herd.model.layers import apply_rope_interleaved

# Llama 4's image normalisation (Meta's preprocess.py and transformers' Llama4ImageProcessor).
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
DEFAULT_MAX_TILES = 16
# Both references build their layer norms with nn.LayerNorm's default eps and ignore the config's
# `norm_eps` (1e-5 in every published config anyway).
LAYER_NORM_EPS = 1e-5


def _square(value: Any, name: str) -> int:
    """image_size / patch_size may be an int or a [height, width] pair; herd needs squares."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config.{name} must be square, got {value}")
        value = value[0]
    return int(value)


@dataclass
class VisionConfig:
    image_size: int = 336  # tile side in pixels
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632  # encoder MLP; also the pixel-shuffled width (hidden / ratio^2)
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096  # adapter fc1 output
    projector_output_dim: int = 4096  # adapter fc2 output
    vision_output_dim: int = 4096  # multi_modal_projector input
    text_hidden_size: int = 5120  # multi_modal_projector output
    # From the saved image processor settings when the checkpoint has them (herd/processor_config.py).
    image_mean: tuple[float, float, float] = DEFAULT_IMAGE_MEAN
    image_std: tuple[float, float, float] = DEFAULT_IMAGE_STD
    max_tiles: int = DEFAULT_MAX_TILES

    def __post_init__(self) -> None:
        side = self.patches_per_side
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        head_dim, rem = divmod(self.hidden_size, self.num_attention_heads)
        if rem or head_dim % 4:
            # The 2D rotary embedding gives a quarter of each head's dims to x and a quarter to y pairs.
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} / {self.num_attention_heads} heads must be a multiple of 4"
            )
        shuffled_side = side * self.pixel_shuffle_ratio
        if shuffled_side != int(shuffled_side) or self.hidden_size % round(1 / self.pixel_shuffle_ratio**2):
            raise ConfigError(
                f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} does not divide {side} patches per side "
                f"and hidden_size {self.hidden_size}"
            )
        # The adapter's fc1 is declared with in_features = intermediate_size, but what it receives is
        # the pixel-shuffled width; transformers can only run configs where the two agree.
        if self.shuffled_dim != self.intermediate_size:
            raise ConfigError(
                f"vision intermediate_size {self.intermediate_size} must equal hidden_size / pixel_shuffle_ratio^2 "
                f"= {self.shuffled_dim} (the adapter's input width)"
            )
        if self.projector_input_dim != self.projector_output_dim:
            raise ConfigError(
                f"vision projector_input_dim {self.projector_input_dim} must equal projector_output_dim "
                f"{self.projector_output_dim} (the adapter's fc2 is square)"
            )
        if self.vision_output_dim != self.projector_output_dim:
            raise ConfigError(
                f"vision_output_dim {self.vision_output_dim} must equal projector_output_dim "
                f"{self.projector_output_dim} (it is the multi_modal_projector's input)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffled_dim(self) -> int:
        return int(self.hidden_size / self.pixel_shuffle_ratio**2)

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens per tile: 144 for 336 px tiles of 14 px patches at ratio 0.5."""
        return self.patches_per_side**2 // round(1 / self.pixel_shuffle_ratio**2)

    @classmethod
    def from_dict(
        cls, vision: dict[str, Any], text_hidden_size: int, preprocessor: dict[str, Any] | None = None
    ) -> VisionConfig:
        """From a raw `vision_config` dict (published or transformers 5 spelling)."""
        defaults = cls.__dataclass_fields__
        get = lambda key: vision.get(key, defaults[key].default)  # noqa: E731
        rope = vision.get("rope_parameters") or {}
        kwargs: dict[str, Any] = dict(
            image_size=_square(get("image_size"), "image_size"),
            patch_size=_square(get("patch_size"), "patch_size"),
            num_channels=int(get("num_channels")),
            hidden_size=int(get("hidden_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            intermediate_size=int(get("intermediate_size")),
            rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", defaults["rope_theta"].default))),
            pixel_shuffle_ratio=float(get("pixel_shuffle_ratio")),
            projector_input_dim=int(get("projector_input_dim")),
            projector_output_dim=int(get("projector_output_dim")),
            vision_output_dim=int(get("vision_output_dim")),
            text_hidden_size=int(text_hidden_size),
        )
        if vision.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"unsupported vision hidden_act {vision['hidden_act']!r} (Llama 4 uses gelu)")
        if preprocessor:
            from herd.processor_config import PREPROCESSOR_FILE, image_settings

            kwargs.update(image_settings(preprocessor, PREPROCESSOR_FILE, kwargs["image_size"]))
        return cls(**kwargs)

    @classmethod
    def from_model_config(cls, model_config: ModelConfig, model_dir: str | Path | None = None) -> VisionConfig:
        """The vision config of a multimodal checkpoint; with `model_dir`, also its saved image
        processor settings (processor_config.json or preprocessor_config.json, as transformers reads them)."""
        if not model_config.vision:
            raise ConfigError("the checkpoint has no vision_config: it cannot take images")
        cfg = cls.from_dict(model_config.vision, model_config.text.hidden_size)
        if model_dir is None:
            return cfg
        from herd.processor_config import check_processor_settings, image_settings, read_processor_configs

        settings, source, processor = read_processor_configs(model_dir)
        check_processor_settings(processor, patch_size=cfg.patch_size, pixel_shuffle_ratio=cfg.pixel_shuffle_ratio)
        if settings:
            cfg = dataclasses.replace(cfg, **image_settings(settings, source, cfg.image_size))
        return cfg


def vision_rope_cos_sin(cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [patches + 1, head_dim / 2] of the 2D rotary embedding (class token last, unrotated).

    The first quarter of each head's complex pairs turns with the patch's column (x + 1), the second
    quarter with its row (y + 1), both with the same frequencies; the class token gets angle 0.
    """
    side = cfg.patches_per_side
    freq_dim = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, freq_dim, 2, device="cpu")[: freq_dim // 2].float() / freq_dim))
    idx = torch.arange(side * side, device="cpu")
    x = (idx % side + 1).float()[:, None] * freqs[None, :]
    y = (idx // side + 1).float()[:, None] * freqs[None, :]
    angles = torch.cat([torch.cat([x, y], dim=-1), torch.zeros(1, freq_dim, device="cpu")], dim=0)
    return torch.cos(angles), torch.sin(angles)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[tiles, side*side, C] -> [tiles, (side*ratio)^2, C/ratio^2], merging neighbouring patches.

    The exact order of the reshapes matters: it decides which channels of the merged token come from
    which patch, and the adapter's weights were trained for this one (transformers' pixel_shuffle).
    """
    tiles, n, channels = x.shape
    side = int(n**0.5)
    x = x.view(tiles, side, side, channels)
    x = x.view(tiles, side, int(side * ratio), int(channels / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(tiles, int(side * ratio), int(side * ratio), int(channels / ratio**2))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(tiles, -1, x.shape[-1])


class PatchEmbedding(nn.Module):
    """Non-overlapping patches, flattened channel-major (as nn.Unfold does), then one linear layer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        p = self.patch_size
        patches = pixels.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.linear(patches.reshape(b, (h // p) * (w // p), c * p * p))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = apply_rope_interleaved(self.q_proj(x).view(shape), cos, sin)
        k = apply_rope_interleaved(self.k_proj(x).view(shape), cos, sin)
        v = self.v_proj(x).view(shape)
        # Every token of a tile sees every other token of the same tile (no mask, not causal).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionLayers(nn.Module):
    """Holds the layers under `model.layers.*`, the checkpoint's naming."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class AdapterMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.shuffled_dim, cfg.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(cfg.projector_input_dim, cfg.projector_output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class PixelShuffleAdapter(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = AdapterMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionModel(nn.Module):
    """`vision_model.*`: tiles -> adapter features [tiles, tokens_per_tile, projector_output_dim]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n = cfg.patches_per_side**2 + 1  # + the class token
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(n, cfg.hidden_size))
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.model = VisionLayers(cfg)
        self.vision_adapter = PixelShuffleAdapter(cfg)
        # Plain attributes, not buffers: derived from the config, never loaded, and they survive
        # `to_empty` (the model is built on the meta device).
        self.rope_cos, self.rope_sin = vision_rope_cos_sin(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm.to(x.dtype)
        x = self.layernorm_pre(x)
        cos, sin = self.rope_cos.to(x.device), self.rope_sin.to(x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.layernorm_post(x)[:, :-1]  # drop the class token
        return self.vision_adapter(x)


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.vision_output_dim, cfg.text_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class Llama4VisionEncoder(nn.Module):
    """Vision tower + projector: pixel tiles -> the embeddings of their <|patch|> tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg)
        self.multi_modal_projector = MultiModalProjector(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] -> [tiles, tokens_per_tile, text_hidden], in the order of the <|patch|> tokens."""
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [tiles, {', '.join(map(str, want))}], got {list(pixel_values.shape)}")
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        features = self.vision_model(pixel_values.to(dtype))
        return self.multi_modal_projector(features)


def build_vision_model(cfg: VisionConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> Llama4VisionEncoder:
    """An uninitialised encoder: parameters are allocated but hold garbage until loaded."""
    with torch.device("meta"):
        model = Llama4VisionEncoder(cfg).to(dtype)
    return model.to_empty(device=device)


def vision_param_name(checkpoint_name: str) -> str | None:
    """herd's parameter name for a checkpoint tensor; None for tensors that are not the vision tower's."""
    name = checkpoint_name.removeprefix("model.")  # transformers 5 may nest everything under model.
    if name.startswith(("vision_model.", "multi_modal_projector.")):
        return name
    return None


@torch.no_grad()
def load_vision_model(
    model_dir: str | Path,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Llama4VisionEncoder:
    """Streams `vision_model.*` and `multi_modal_projector.*` out of the checkpoint's shards."""
    # Imported here: checkpoint.py imports the text model, and the vision tower does not need it.
    from herd.checkpoint import CheckpointError, _open, shard_files

    cfg = VisionConfig.from_model_config(model_config, model_dir)
    model = build_vision_model(cfg, dtype, device)
    params = dict(model.named_parameters())

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ckpt_name, file in shard_files(model_dir).items():
        name = vision_param_name(ckpt_name)
        if name is not None:
            by_file.setdefault(file, []).append((ckpt_name, name))

    loaded: set[str] = set()
    for file, names in sorted(by_file.items()):
        handle = _open(file)
        available = set(handle.keys())
        for ckpt_name, name in sorted(names):
            if ckpt_name not in available:
                raise CheckpointError(f"tensor {ckpt_name} is listed in the index but missing from {file.name}")
            param = params.get(name)
            if param is None:
                raise CheckpointError(f"unexpected tensor {ckpt_name}: the vision tower has no parameter {name}")
            shape = tuple(handle.get_slice(ckpt_name).get_shape())
            if shape != tuple(param.shape):
                raise CheckpointError(
                    f"tensor {ckpt_name} has shape {list(shape)}, the vision config expects {list(param.shape)}"
                )
            try:
                tensor = handle.get_tensor(ckpt_name)
            except Exception as e:
                raise CheckpointError(f"cannot read tensor {ckpt_name} from {file.name}: {e}") from None
            param.copy_(tensor)
            loaded.add(name)

    missing = set(params) - loaded
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise CheckpointError(f"checkpoint is missing {len(missing)} vision tensor(s): {shown}")
    return model.eval()
