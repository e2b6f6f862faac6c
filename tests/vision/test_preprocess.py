"""Image preprocessing against Meta's preprocess.py and transformers' Llama4ImageProcessor.

The references' outputs are fixtures (tests/fixtures/make_vision_fixtures.py; they need torchvision,
which does not import here). The input images are redrawn with the same integer formula, saved in a
lossless format and decoded with herd's load_image, so decoding and RGB conversion are covered too.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from herd.model.vision import VisionConfig
from herd.multimodal import best_grid, image_token_count, image_token_ids, load_image, preprocess
from herd.tokenizer import Tokenizer
from tests.fixtures.make_vision_fixtures import synthetic_image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vision"
SPEC = json.loads((FIXTURES / "cases.json").read_text())
CASES = {case["name"]: case for case in SPEC["cases"]}
META_TOL = 1e-5
# transformers resizes uint8 tensors with torchvision (antialiased) and normalises in bfloat16;
# the fixture script measured at most 0.0118 between the two references.
HF_MAX_TOL = 1.5e-2
HF_MEAN_TOL = 3e-3


@pytest.fixture(scope="module")
def pixels():
    with np.load(FIXTURES / "pixels.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def llama4_tokenizer(demo_dir):
    """The real Llama 4 vocabulary, as the demo checkpoint ships it (written once per session)."""
    return Tokenizer.from_dir(demo_dir)


def unrle(pairs):
    return [token for token, count in pairs for _ in range(count)]


def lossless_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def herd_processed(case):
    source = synthetic_image(case["width"], case["height"], case["mode"], seed=case["seed"])
    rgb = load_image(lossless_bytes(source))
    cfg = VisionConfig(image_size=case["tile"], max_tiles=case["max_tiles"])
    return preprocess(rgb, cfg), cfg


def meta_float(u8: np.ndarray) -> np.ndarray:
    """Meta's float32 values from their lossless uint8 form (ToTensor then Normalize(0.5, 0.5))."""
    return torch.from_numpy(u8).float().div(255).sub(0.5).div(0.5).numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_tiles_match_meta_and_transformers(name, pixels):
    case = CASES[name]
    processed, _ = herd_processed(case)
    got = processed.pixel_values.numpy()

    assert list(processed.grid) == case["meta"]["grid"] == case["hf"]["grid"]
    assert got.shape[0] == case["meta"]["tiles"] == case["hf"]["tiles"]
    assert got.shape[1:] == (3, case["tile"], case["tile"])
    assert got.dtype == np.float32

    if f"{name}.meta_u8" in pixels:
        want = meta_float(pixels[f"{name}.meta_u8"])
        assert np.abs(got - want).max() <= META_TOL
    else:
        flat = got.reshape(-1)
        positions = pixels[f"{name}.meta_positions"]
        want = meta_float(pixels[f"{name}.meta_u8_samples"])
        assert np.abs(flat[positions] - want).max() <= META_TOL
        # Every pixel: herd's values are exactly Meta's (u8 / 255 - 0.5) / 0.5.
        u8 = np.rint((got * 0.5 + 0.5) * 255).astype(np.uint8)
        assert np.array_equal(meta_float(u8), got)
        assert hashlib.sha256(u8.tobytes()).hexdigest() == case["meta"]["u8_sha256"]

    hf = pixels[f"{name}.hf_values"]
    diff = np.abs(got.reshape(-1)[pixels[f"{name}.hf_positions"]] - hf)
    assert diff.max() <= HF_MAX_TOL
    assert diff.mean() <= HF_MEAN_TOL


@pytest.mark.parametrize("name", list(CASES))
def test_token_layout_matches_meta_and_transformers(name, llama4_tokenizer):
    case = CASES[name]
    per_tile = (case["tile"] // SPEC["patch_size"]) ** 2 // 4
    grid = tuple(case["meta"]["grid"])
    ids = image_token_ids(grid, per_tile, llama4_tokenizer)
    assert ids == unrle(case["meta"]["ids_rle"])
    assert ids == unrle(case["hf"]["ids_rle"])
    assert len(ids) == image_token_count(grid, per_tile)


def test_real_layout_token_ids(llama4_tokenizer):
    """The published ids (../shared/LLAMA4.md), 144 patches per 336 px tile."""
    cfg = VisionConfig()
    assert cfg.tokens_per_tile == 144
    one = image_token_ids((1, 1), 144, llama4_tokenizer)
    assert one == [200080, 200090] + [200092] * 144 + [200081]
    two = image_token_ids((1, 2), 144, llama4_tokenizer)
    assert two == [200080] + [200092] * 144 + [200084] + [200092] * 144 + [200085, 200090] + [200092] * 144 + [200081]


def test_grid_choice_properties():
    # No upscaling needed beyond one tile: smallest canvas that holds the image without distortion.
    assert best_grid(336, 336, 336, 16) == (1, 1)
    assert best_grid(100, 100, 336, 16) == (1, 1)
    assert best_grid(672, 336, 336, 16) == (1, 2)
    assert best_grid(336, 672, 336, 16) == (2, 1)
    assert best_grid(5000, 5000, 336, 16) == (4, 4)
    assert best_grid(10000, 100, 336, 16) == (1, 16)
    assert best_grid(10000, 100, 336, 4) == (1, 4)
    for w, h in [(1, 1), (3000, 17), (17, 3000), (1920, 1080), (1080, 1920), (4032, 3024)]:
        rows, cols = best_grid(w, h, 336, 16)
        assert 1 <= rows * cols <= 16


def test_thumbnail_and_padding():
    cfg = VisionConfig(image_size=56)
    image = synthetic_image(100, 30, "RGB")
    out = preprocess(image, cfg)
    assert out.grid == (1, 2)
    assert out.num_tiles == 3
    # A 112x56 canvas; upscaling stops at max(side, tile), so the image keeps its 100x30 pixels and
    # the rest is black padding (-1 after normalising).
    assert torch.all(out.pixel_values[:2, :, 30:, :] == -1)
    # The global thumbnail is the whole image squashed to one tile: no padding.
    assert (out.pixel_values[2] == -1).float().mean() < 0.05


def test_mean_std_from_preprocessor_config():
    cfg = VisionConfig(image_size=56, image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 0.125))
    white = synthetic_image(56, 56, "RGB").point(lambda _: 255)
    out = preprocess(white, cfg)
    assert out.grid == (1, 1)
    for c, (m, s) in enumerate(zip(cfg.image_mean, cfg.image_std)):
        assert torch.allclose(out.pixel_values[0, c], torch.tensor((1 - m) / s))


def test_content_hash():
    a = synthetic_image(60, 40, "RGB", seed=1)
    b = synthetic_image(60, 40, "RGB", seed=2)
    ha = preprocess(a, VisionConfig(image_size=56)).content_hash
    assert len(ha) == 32
    # Same pixels through another lossless format: same hash.
    buf = io.BytesIO()
    a.save(buf, format="WEBP", lossless=True)
    assert preprocess(load_image(buf.getvalue()), VisionConfig(image_size=56)).content_hash == ha
    assert preprocess(b, VisionConfig(image_size=56)).content_hash != ha
    # Same bytes, other shape: different hash.
    c = a.resize((40, 60))
    c.frombytes(a.tobytes())
    assert preprocess(c, VisionConfig(image_size=56)).content_hash != ha
