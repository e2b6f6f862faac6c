"""Images for Llama 4: bytes -> RGB picture -> normalised pixel tiles + the prompt's image tokens.

Tiling is Meta's (llama_models/llama4/preprocess.py; transformers' Llama4ImageProcessor does the same):
  1. canvases: every (rows x cols) grid of square tiles with rows * cols <= max_tiles;
  2. pick the canvas whose no-distortion scale factor is the smallest one >= 1 (no canvas needs
     less upscaling), else the largest one < 1 (least downscaling); ties -> the smallest area;
  3. resize without distortion into it (bilinear; never upscale past one tile's side unless the
     image is smaller than that), paste top-left onto black, normalise, cut into tiles row-major;
  4. more than one tile: append a global thumbnail, the whole image squashed to one tile.
Pixel values equal Meta's preprocess (PIL resize, float32) exactly; transformers resizes uint8
tensors with torchvision and normalises in bfloat16, which agrees to about 1e-2.

Only Pillow, torch and the standard library: herd.model and herd.engine stay importable without
the server's packages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from herd.model.vision import VisionConfig
    from herd.tokenizer import Tokenizer

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
# 64 megapixels: far beyond what the model sees (16 tiles of 336 px are 1.8 MP), small enough that
# one decoded image costs at most ~256 MB of RGBA.
DEFAULT_MAX_PIXELS = 64_000_000
WHITE = (255, 255, 255)

# Leading bytes of image formats herd does not take (Pillow is never asked to parse them), to say
# "unsupported format" rather than "not an image".
_OTHER_IMAGE_SIGNATURES = {
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO",
    b"8BPS": "PSD",
    b"\xff\x0a": "JPEG XL",
    b"\x00\x00\x00\x0cJXL ": "JPEG XL",
    b"%PDF": "PDF",
    b"qoif": "QOI",
    b"icns": "ICNS",
}
_ISO_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}


class ImageError(ValueError):
    """An image herd cannot use; the message says why (it is shown to the API client)."""


def _other_format(data: bytes) -> str | None:
    for magic, name in _OTHER_IMAGE_SIGNATURES.items():
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return _ISO_BRANDS.get(data[8:12], "ISO media (HEIF/AVIF)")
    if data.lstrip()[:5].lower() in (b"<?xml", b"<svg ", b"<svg>"):
        return "SVG"
    return None


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes JPEG, PNG, WebP or GIF (first frame) bytes to an RGB image, alpha composited onto white.

    The pixel limit is checked from the header, before anything is decompressed, and does not depend
    on Pillow's global Image.MAX_IMAGE_PIXELS. Truncated data is an error as long as nothing in the
    process sets Pillow's global ImageFile.LOAD_TRUNCATED_IMAGES (Meta's preprocess.py does, on
    import: herd never imports it).
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        # Only the four supported decoders ever parse the data. Pillow's own bomb check (a global
        # limit) may fire first for huge headers; herd applies `max_pixels` itself just below.
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as e:
        # Pillow refuses headers above 2 x Image.MAX_IMAGE_PIXELS (~179 MP by default) by itself.
        raise ImageError(f"the image has too many pixels ({e})") from None
    except UnidentifiedImageError:
        other = _other_format(data)
        if other:
            raise ImageError(f"unsupported image format {other} (supported: JPEG, PNG, WebP, GIF)") from None
        raise ImageError("the data is not an image (supported formats: JPEG, PNG, WebP, GIF)") from None
    except Exception as e:  # a recognised header that fails to parse
        raise ImageError(f"the image data is corrupt or truncated ({e})") from None

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"the image has too many pixels ({width}x{height} = {width * height:,}; the limit is {max_pixels:,})")
    try:
        image.seek(0)  # animated GIF / WebP: the first frame
        image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image has too many pixels ({e})") from None
    except Exception as e:  # OSError "image file is truncated", broken data streams, bad CRCs, ...
        reason = str(e) or type(e).__name__
        kind = "truncated" if "truncat" in reason.lower() else "corrupt or truncated"
        raise ImageError(f"the image data is {kind} ({image.format}: {reason})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (RGBA, LA, P with a transparent colour, ...) composited onto white."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB", "I", "I;16") and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    # Exactly Meta's convert_image_to_rgb (chat_format.py): paste through the alpha channel.
    out = Image.new("RGB", rgba.size, WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def decode_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a `data:image/<type>;base64,<payload>` URL."""
    if not url.startswith("data:"):
        raise ImageError("not a data URL (expected data:image/...;base64,...)")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError("malformed data URL: no ',' between the media type and the data")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if not media_type.startswith("image/"):
        raise ImageError(f"data URL media type is {media_type or 'missing'!r}; expected image/*")
    if "base64" not in params[1:]:
        raise ImageError("data URL must be base64-encoded (data:image/...;base64,...)")
    payload = "".join(payload.split())  # line breaks and spaces are common in pasted base64
    if max_bytes is not None and len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"the image is too large (more than {max_bytes:,} bytes)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"invalid base64 data in data URL: {e}") from None
    if not data:
        raise ImageError("the data URL holds no data")
    return data


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [tiles (+ 1 global when tiles > 1), 3, S, S] float32
    grid: tuple[int, int]  # (tile rows, tile columns)
    content_hash: bytes  # sha256 of the decoded RGB pixels and size: identical images share prefix-cache blocks

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision tower (the global thumbnail included)."""
        return self.pixel_values.shape[0]


def content_hash(image: Image.Image) -> bytes:
    rgb = to_rgb(image)
    h = hashlib.sha256(b"herd-rgb-v1")
    h.update(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.digest()


def supported_canvases(max_tiles: int) -> list[tuple[int, int]]:
    """(rows, cols) grids with rows * cols <= max_tiles, in the references' order (ties pick the first)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """The (rows, cols) canvas Meta's get_best_fit picks for a width x height image."""
    grids = supported_canvases(max_tiles)
    # Scales in float32, as both references compute them (torch tensors): ties and the >= 1 test
    # must come out the same.
    canvas = torch.tensor(grids) * tile
    scale_h = canvas[:, 0] / height
    scale_w = canvas[:, 1] / width
    scales = torch.minimum(scale_h, scale_w)
    up = scales[scales >= 1]
    chosen_scale = up.min() if len(up) else scales[scales < 1].max()
    candidates = [i for i in range(len(grids)) if scales[i] == chosen_scale]
    best = min(candidates, key=lambda i: grids[i][0] * grids[i][1])  # min() keeps the first of equals
    return grids[best]


def _fit_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Largest (w, h) with the image's aspect ratio inside target (Meta's get_max_res_without_distortion)."""
    scale_w = target_w / width
    scale_h = target_h / height
    if scale_w < scale_h:
        return target_w, min(math.floor(height * scale_w), target_h)
    return min(math.floor(width * scale_h), target_w), target_h


def _normalise(image: Image.Image, mean, std) -> torch.Tensor:
    """uint8 RGB -> [3, H, W] float32 ((x / 255) - mean) / std, in torchvision's ToTensor/Normalize order."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = pixels.view(image.height, image.width, 3).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return x.sub_(mean_t).div_(std_t)


def preprocess(image: Image.Image, cfg: VisionConfig, max_tiles: int | None = None) -> ProcessedImage:
    """An RGB image -> normalised tiles for the vision tower, its tile grid and content hash.

    `max_tiles` defaults to the checkpoint's (preprocessor_config.json max_patches; 16 for Llama 4).
    """
    max_tiles = cfg.max_tiles if max_tiles is None else max_tiles
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    image = to_rgb(image)
    tile = cfg.image_size
    width, height = image.size
    rows, cols = best_grid(width, height, tile, max_tiles)
    canvas_w, canvas_h = cols * tile, rows * tile

    # Never upscale past one tile's side (unless the image is smaller than that): small images keep
    # their size and get padded instead.
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    new_w, new_h = _fit_size(width, height, target_w, target_h)
    resized = image.resize((max(new_w, 1), max(new_h, 1)), Image.Resampling.BILINEAR)
    padded = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    padded.paste(resized)

    x = _normalise(padded, cfg.image_mean, cfg.image_std)
    tiles = x.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        thumbnail = image.resize((tile, tile), Image.Resampling.BILINEAR)
        tiles = torch.cat([tiles, _normalise(thumbnail, cfg.image_mean, cfg.image_std)[None]], dim=0)
    return ProcessedImage(pixel_values=tiles.contiguous(), grid=(rows, cols), content_hash=content_hash(image))


IMAGE_TOKENS = (
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)


def image_token_ids(grid: tuple[int, int], tokens_per_tile: int, tok: Tokenizer) -> list[int]:
    """The prompt tokens of one image, exactly as Meta's ChatFormat lays them out.

    Multi-tile: <|image_start|>, each tile row as tiles of <|patch|> x tokens_per_tile separated by
    <|tile_x_separator|> and closed by <|tile_y_separator|>, then <|image|> + the global thumbnail's
    patches, <|image_end|>. One tile: <|image_start|><|image|> + patches + <|image_end|>.
    """
    ids = {}
    for name in IMAGE_TOKENS:
        token_id = tok.token_to_id(name)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {name} token: not a Llama 4 vocabulary")
        ids[name] = token_id
    patches = [ids["<|patch|>"]] * tokens_per_tile
    rows, cols = grid
    out = [ids["<|image_start|>"]]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                out += patches
                if col < cols - 1:
                    out.append(ids["<|tile_x_separator|>"])
            out.append(ids["<|tile_y_separator|>"])
    out.append(ids["<|image|>"])
    out += patches
    out.append(ids["<|image_end|>"])
    return out


def image_token_count(grid: tuple[int, int], tokens_per_tile: int) -> int:
    """len(image_token_ids(grid, ...)) without a tokenizer."""
    rows, cols = grid
    tiles = rows * cols
    if tiles == 1:
        return tokens_per_tile + 3
    return 1 + tiles * tokens_per_tile + rows * (cols - 1) + rows + 1 + tokens_per_tile + 1
