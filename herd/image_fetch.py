"""Fetches images named by http(s) URLs in requests, safely.

A server that fetches URLs for its clients can be turned against its own network (SSRF): by
default, hosts that resolve to private, loopback, link-local or otherwise internal addresses
are refused. The connection goes to the very address that was checked (a second DNS lookup
could answer differently: "DNS rebinding"), never through a proxy, redirects are checked the
same way, and every fetch has an overall deadline and a byte limit.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse

MAX_REDIRECTS = 5


class FetchError(ValueError):
    """The URL cannot or may not be fetched; the message says why."""


def _resolve(url: str, allow_private: bool) -> tuple[urllib.parse.SplitResult, str, int]:
    """The URL's parts and the one address (and port) the fetch will connect to."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL scheme {parts.scheme!r}: use http, https or a data: URL")
    if not parts.hostname:
        raise FetchError("the image URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError("the image URL has an invalid port") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve {parts.hostname}: {e.strerror}") from None
    addresses = [info[4][0].split("%")[0] for info in infos]
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if not ip.is_global or ip.is_multicast:
                raise FetchError(
                    f"{parts.hostname} resolves to a private or internal address ({ip}); "
                    "start the server with --allow-private-image-urls to allow it"
                )
    return parts, addresses[0], port


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a given address while the Host header keeps the URL's name."""

    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        # The certificate is checked against the URL's host name, not the address.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _get(parts: urllib.parse.SplitResult, address: str, port: int, timeout: float) -> http.client.HTTPResponse:
    kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = kind(parts.hostname, address, port, timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    connection.request("GET", path, headers={"User-Agent": "herd-image-fetch", "Accept": "image/*"})
    return connection.getresponse()


def fetch_url(url: str, *, timeout: float = 10.0, max_bytes: int = 20 * 2**20, allow_private: bool = False) -> bytes:
    """The body of `url`, or FetchError (unreachable, too large, too slow, refused address, bad status)."""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(MAX_REDIRECTS + 1):
            parts, address, port = _resolve(url, allow_private)
            response = _get(parts, address, port, max(0.1, deadline - time.monotonic()))
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                response.close()
                continue
            if response.status != 200:
                raise FetchError(f"fetching {url} failed with HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"the image at {url} is {int(declared)} bytes; the limit is {max_bytes}")
            return _read(response, url, max_bytes, deadline)
        raise FetchError(f"fetching {url} took more than {MAX_REDIRECTS} redirects")
    except FetchError:
        raise
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"cannot fetch {url}: {e}") from None


def _read(response: http.client.HTTPResponse, url: str, max_bytes: int, deadline: float) -> bytes:
    """Reads the body in pieces, so a server trickling bytes cannot outlast the deadline."""
    body = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise FetchError(f"fetching {url} took too long")
        piece = response.read1(64 * 1024) if hasattr(response, "read1") else response.read(64 * 1024)
        if not piece:
            return bytes(body)
        body += piece
        if len(body) > max_bytes:
            raise FetchError(f"the image at {url} is larger than the limit of {max_bytes} bytes")
