"""Images through the HTTP API (the demo checkpoint has a vision tower): data and http URLs,
limits, and a 400 naming the problem for every bad image, with the server still serving."""

import base64
import http.server
import io
import threading

import pytest
from PIL import Image

from tests.server.conftest import MODEL, make_server


def _png(width=64, height=48, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def _data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def _chat(http, urls, **extra):
    content = [{"type": "text", "text": "What is in these pictures?"}]
    content += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
    return http.post("/v1/chat/completions", json={**body, **extra})


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = _png(90, 40, (10, 200, 10)) if self.path == "/ok.png" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _sdk_messages(urls):
    content = [{"type": "text", "text": "What is in these pictures?"}]
    content += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": content}]


def test_one_to_five_images_through_the_openai_sdk(base_url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    previous = client.chat.completions.create(
        model=MODEL, messages=_sdk_messages([]), max_tokens=4, temperature=0
    ).usage.prompt_tokens
    for n in range(1, 6):
        urls = [_data_url(_png(40 + 30 * i, 60, (i * 40, 90, 200))) for i in range(n)]
        reply = client.chat.completions.create(model=MODEL, messages=_sdk_messages(urls), max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        tokens = reply.usage.prompt_tokens
        assert tokens >= previous + 144  # images count as prompt tokens: at least one 144-token tile each
        previous = tokens
    stream = client.chat.completions.create(
        model=MODEL, messages=_sdk_messages(urls[:1]), max_tokens=4, temperature=0, stream=True
    )
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream)


def test_six_images_are_refused(base_url):
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="at most 5 images"):
        client.chat.completions.create(model=MODEL, messages=_sdk_messages([_data_url(_png())] * 6), max_tokens=4)


def test_streaming_with_an_image(http):
    with http.stream("POST", "/v1/chat/completions", json={
        "model": MODEL, "stream": True, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png())}}]}],
    }) as response:
        body = response.read().decode()
    assert response.status_code == 200 and body.rstrip().endswith("data: [DONE]")


def test_http_urls_need_the_allow_option(engine, http, image_host):
    import openai

    reply = _chat(http, [f"{image_host}/ok.png"])
    assert reply.status_code == 400 and "private or internal" in reply.json()["error"]["message"]
    with make_server(engine, allow_private_image_urls=True) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ok = client.chat.completions.create(
            model=MODEL, messages=_sdk_messages([f"{image_host}/ok.png"]), max_tokens=2, temperature=0
        )
        assert ok.usage.prompt_tokens > 144
        with pytest.raises(openai.BadRequestError, match="404"):
            client.chat.completions.create(model=MODEL, messages=_sdk_messages([f"{image_host}/missing.png"]), max_tokens=2)


def _bomb() -> bytes:
    """A PNG whose header claims 100,000 x 100,000 pixels (10 gigapixels)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "not an image": _data_url(b"hello, I am text"),
    "truncated": _data_url(_png(200, 200)[:120]),
    "unsupported format": _data_url(b"BM" + b"\x00" * 60, "image/bmp"),
    "decompression bomb": _data_url(_bomb()),
    "broken base64": "data:image/png;base64,@@@not-base64@@@",
    "unreachable url": "http://127.0.0.1:9/x.png",
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_get_a_400_and_the_server_keeps_serving(http, case):
    reply = _chat(http, [BAD_IMAGES[case]])
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages" and error["message"]
    assert _chat(http, [_data_url(_png())]).status_code == 200
