"""Decoding: formats, RGB conversion (alpha onto white), data URLs, and every ImageError case."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from herd.multimodal import ImageError, decode_data_url, load_image
from tests.fixtures.make_vision_fixtures import synthetic_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


RGB = synthetic_image(64, 48, "RGB")


def row(image: Image.Image) -> list[tuple[int, ...]]:
    return [image.getpixel((x, 0)) for x in range(image.width)]


@pytest.mark.parametrize("fmt,kwargs", [("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("JPEG", {"quality": 95})])
def test_formats_decode_to_rgb(fmt, kwargs):
    source = RGB if fmt != "GIF" else synthetic_image(64, 48, "P")
    image = load_image(encode(source, fmt, **kwargs))
    assert image.mode == "RGB" and image.size == (64, 48)
    if fmt == "JPEG":  # lossy: the same picture as Pillow decodes it
        assert image.tobytes() == Image.open(io.BytesIO(encode(source, fmt, **kwargs))).convert("RGB").tobytes()
    else:
        assert image.tobytes() == source.convert("RGB").tobytes()


def test_gif_first_frame():
    first = synthetic_image(32, 32, "P", seed=1)
    second = synthetic_image(32, 32, "P", seed=2)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert load_image(data).tobytes() == first.convert("RGB").tobytes()


def test_rgba_alpha_onto_white():
    image = Image.new("RGBA", (4, 1))
    image.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (200, 100, 0, 128), (0, 0, 0, 64)])
    got = row(load_image(encode(image, "PNG")))
    assert got[0] == (255, 255, 255)  # transparent -> white
    assert got[1] == (10, 20, 30)  # opaque -> itself
    assert all(abs(a - b) <= 1 for a, b in zip(got[2], (227, 177, 127)))
    assert all(abs(a - b) <= 1 for a, b in zip(got[3], (191, 191, 191)))


def test_la_and_transparent_palette_onto_white():
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    assert row(load_image(encode(la, "PNG"))) == [(255, 255, 255), (0, 0, 0)]

    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    p.putdata([0, 1])
    p.info["transparency"] = 0
    for fmt in ("PNG", "GIF"):
        assert row(load_image(encode(p, fmt, transparency=0))) == [(255, 255, 255), (255, 0, 0)]
    # Without transparency a palette image is just its colours.
    del p.info["transparency"]
    assert row(load_image(encode(p, "PNG"))) == [(0, 0, 0), (255, 0, 0)]


def test_grayscale_and_cmyk_become_rgb():
    assert load_image(encode(RGB.convert("L"), "PNG")).mode == "RGB"
    assert load_image(encode(RGB.convert("CMYK"), "JPEG")).mode == "RGB"


# --- every ImageError -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"hello, this is text and not an image at all", "not an image"),
        (bytes(range(256)) * 4, "not an image"),
        (encode(RGB, "BMP"), "unsupported image format BMP"),
        (encode(RGB, "TIFF"), "unsupported image format TIFF"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported image format SVG"),
        (b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00", "unsupported image format HEIC"),
        (b"%PDF-1.7\n...", "unsupported image format PDF"),
    ],
    ids=["empty", "text", "noise", "bmp", "tiff", "svg", "heic", "pdf"],
)
def test_not_an_image_or_unsupported(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated(fmt):
    source = RGB if fmt != "GIF" else synthetic_image(64, 48, "P")
    data = encode(source, fmt)
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])


def test_truncated_header():
    data = encode(RGB, "PNG")
    with pytest.raises(ImageError, match="truncated|corrupt|not an image"):
        load_image(data[:20])


def test_corrupt_png_data():
    data = bytearray(encode(RGB, "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = b"\xff" * 50  # garbage in the compressed pixel stream
    with pytest.raises(ImageError, match="corrupt|truncated"):
        load_image(bytes(data))


def test_too_many_pixels_configurable():
    data = encode(RGB, "PNG")  # 64 x 48 = 3,072 pixels
    assert load_image(data, max_pixels=3072).size == (64, 48)
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(data, max_pixels=3071)


@pytest.mark.parametrize("side", [9000, 20000, 60000])
def test_decompression_bomb_refused_from_header(side):
    """Refused before decoding, whatever Pillow's global limit says (20000^2 trips Pillow's own check)."""
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_header_only(side, side))


def test_bomb_check_does_not_depend_on_pillow_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_header_only(20000, 20000))


# --- data URLs --------------------------------------------------------------------------------


def test_data_url_roundtrip():
    data = encode(RGB, "PNG")
    b64 = base64.b64encode(data).decode()
    assert decode_data_url(f"data:image/png;base64,{b64}") == data
    # Media type parameters, case and line breaks in the payload are fine.
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert decode_data_url(f"data:IMAGE/PNG;charset=utf-8;base64,{wrapped}") == data


@pytest.mark.parametrize(
    "url,message",
    [
        ("https://example.com/a.png", "not a data URL"),
        ("data:image/png;base64", "malformed"),
        ("data:text/plain;base64,aGVsbG8=", "media type is 'text/plain'"),
        ("data:;base64,aGVsbG8=", "media type is 'missing'"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64,not*base64!", "invalid base64"),
        ("data:image/png;base64,aGVsbG8", "invalid base64"),
        ("data:image/png;base64,", "no data"),
    ],
)
def test_bad_data_urls(url, message):
    with pytest.raises(ImageError, match=message):
        decode_data_url(url)


def test_data_url_byte_limit():
    url = "data:image/png;base64," + base64.b64encode(b"x" * 3000).decode()
    assert len(decode_data_url(url, max_bytes=3000)) == 3000
    with pytest.raises(ImageError, match="too large"):
        decode_data_url(url, max_bytes=2999)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)
