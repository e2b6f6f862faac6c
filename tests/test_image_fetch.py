"""Image URLs: internal addresses refused by default, limits on size and time, clear errors."""

import http.server
import threading
import time

import pytest

from herd.image_fetch import FetchError, fetch_url

BODY = b"\x89PNG fake image bytes" * 100


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/image.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/slow":  # a byte every 0.3 s: each read is quick, the whole is not
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(20):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:
                pass
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_loopback_is_refused_by_default(server):
    with pytest.raises(FetchError, match="private or internal address"):
        fetch_url(f"{server}/image.png")


def test_allowed_when_asked(server):
    assert fetch_url(f"{server}/image.png", allow_private=True) == BODY
    assert fetch_url(f"{server}/redirect", allow_private=True) == BODY


def test_limits_and_errors(server):
    with pytest.raises(FetchError, match="limit"):
        fetch_url(f"{server}/image.png", allow_private=True, max_bytes=100)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(f"{server}/missing", allow_private=True)
    with pytest.raises(FetchError, match="scheme"):
        fetch_url("file:///etc/passwd")
    with pytest.raises(FetchError, match="private or internal"):
        fetch_url("http://169.254.169.254/latest/meta-data")  # cloud metadata endpoint
    with pytest.raises(FetchError, match="cannot resolve|cannot fetch"):
        fetch_url("http://nonexistent.invalid/x.png")


def test_connects_to_the_checked_address_without_proxies(server, monkeypatch):
    # A proxy in the environment must not carry the request past the address check.
    monkeypatch.setenv("HTTP_PROXY", "http://10.255.255.1:9")
    monkeypatch.setenv("http_proxy", "http://10.255.255.1:9")
    assert fetch_url(f"{server}/image.png", allow_private=True, timeout=5) == BODY
    # "localhost" resolves here once, to loopback, and is refused on that resolution.
    port = server.rsplit(":", 1)[1]
    with pytest.raises(FetchError, match="private or internal"):
        fetch_url(f"http://localhost:{port}/image.png")


def test_a_trickling_server_hits_the_overall_deadline(server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="too long"):
        fetch_url(f"{server}/slow", allow_private=True, timeout=1.0)
    assert time.monotonic() - start < 3
