"""A checkpoint's saved image-processor settings, in every form transformers saves them.

transformers 4 saves a Llama4ImageProcessor as `preprocessor_config.json`; transformers 5 saves
the whole Llama4Processor as one `processor_config.json` with the image processor's settings
nested under "image_processor" (and the processor's own settings, such as patch_size and the
image token strings, at the top). transformers reads the nested settings when they are there and
`preprocessor_config.json` otherwise (ImageProcessingMixin.get_image_processor_dict); herd does
the same. A setting herd cannot honour is a ConfigError naming the file, never a silent default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from herd.config import ConfigError

PROCESSOR_FILE = "processor_config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"

# The processor-level settings of Llama4Processor that herd's image-token layout assumes.
LLAMA4_PROCESSOR_DEFAULTS = {
    "fake_image_token": "<|image|>",
    "image_token": "<|image|>",
    "start_of_image_token": "<|image_start|>",
    "end_of_image_token": "<|image_end|>",
    "patch_token": "<|patch|>",
    "tile_x_separator_token": "<|tile_x_separator|>",
    "tile_y_separator_token": "<|tile_y_separator|>",
}
IMAGE_PROCESSOR_TYPES = ("Llama4ImageProcessor", "Llama4ImageProcessorFast")
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers saves `resample`


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def read_processor_configs(model_dir: str | Path) -> tuple[dict[str, Any] | None, str, dict[str, Any]]:
    """(image processor settings or None, the file they came from, the processor's top-level settings)."""
    model_dir = Path(model_dir)
    processor = _read(model_dir / PROCESSOR_FILE) or {}
    nested = processor.get("image_processor")
    top = {k: v for k, v in processor.items() if k != "image_processor"}
    if isinstance(nested, dict):
        return nested, f"{PROCESSOR_FILE} (image_processor)", top
    return _read(model_dir / PREPROCESSOR_FILE), PREPROCESSOR_FILE, top


def image_settings(pre: dict[str, Any], source: str, image_size: int) -> dict[str, Any]:
    """VisionConfig fields from the image processor's settings; refuses the ones herd cannot follow."""
    kind = pre.get("image_processor_type")
    if kind is not None and kind not in IMAGE_PROCESSOR_TYPES:
        raise ConfigError(f"{source}: image_processor_type {kind!r} is not Llama 4's ({' or '.join(IMAGE_PROCESSOR_TYPES)})")
    out: dict[str, Any] = {}
    for key in ("image_mean", "image_std"):
        if pre.get(key) is not None:
            value = pre[key]
            value = [value] * 3 if isinstance(value, (int, float)) else list(value)
            if len(value) != 3:
                raise ConfigError(f"{source} {key} must have 3 values, got {value}")
            out[key] = tuple(float(v) for v in value)
    if pre.get("max_patches") is not None:
        if int(pre["max_patches"]) < 1:
            raise ConfigError(f"{source} max_patches must be at least 1, got {pre['max_patches']}")
        out["max_tiles"] = int(pre["max_patches"])
    size = pre.get("size")
    if isinstance(size, dict) and size.get("height") is not None:
        if int(size["height"]) != image_size or int(size.get("width", size["height"])) != image_size:
            raise ConfigError(f"{source} size {size} does not match the vision tower's image_size {image_size}")
    unsupported = []
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if pre.get(key) is False:
            unsupported.append(f"{key}=false")
    if pre.get("do_center_crop"):
        unsupported.append("do_center_crop=true")
    if pre.get("resize_to_max_canvas"):
        unsupported.append("resize_to_max_canvas=true")
    if pre.get("resample") is not None and pre["resample"] != BILINEAR:
        unsupported.append(f"resample={pre['resample']} (herd resizes bilinearly, resample=2)")
    factor = pre.get("rescale_factor")
    if factor is not None and not math.isclose(float(factor), 1 / 255, rel_tol=1e-6):
        unsupported.append(f"rescale_factor={factor} (herd scales by 1/255)")
    if unsupported:
        raise ConfigError(f"{source} asks for what herd's image preprocessing does not do: {', '.join(unsupported)}")
    return out


def check_processor_settings(top: dict[str, Any], *, patch_size: int, pixel_shuffle_ratio: float) -> None:
    """The processor's own settings must agree with the vision tower and Llama 4's image tokens."""
    if top.get("patch_size") is not None and int(top["patch_size"]) != patch_size:
        raise ConfigError(f"{PROCESSOR_FILE} patch_size {top['patch_size']} differs from the vision tower's {patch_size}")
    ratio = top.get("pixel_shuffle_ratio")
    if ratio is not None and not math.isclose(float(ratio), pixel_shuffle_ratio):
        raise ConfigError(
            f"{PROCESSOR_FILE} pixel_shuffle_ratio {ratio} differs from the vision tower's {pixel_shuffle_ratio}"
        )
    for key, expected in LLAMA4_PROCESSOR_DEFAULTS.items():
        if top.get(key) is not None and top[key] != expected:
            raise ConfigError(f"{PROCESSOR_FILE} {key} {top[key]!r}: herd lays out images with {expected!r}")
