"""Fetches images named by http(s) URLs in requests, safely.

A server that fetches URLs for its clients can be turned against its own network (SSRF): by
default, hosts that resolve to private, loopback, link-local or otherwise internal addresses
are refused, redirects are checked the same way, and every fetch has a timeout and a byte limit.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request


class FetchError(ValueError):
    """The URL cannot or may not be fetched; the message says why."""


def _check_host(url: str, allow_private: bool) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL scheme {parts.scheme!r}: use http, https or a data: URL")
    if not parts.hostname:
        raise FetchError("the image URL has no host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve {parts.hostname}: {e.strerror}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise FetchError(
                f"{parts.hostname} resolves to a private or internal address ({address}); "
                "start the server with --allow-private-image-urls to allow it"
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_host(newurl, self.allow_private)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, *, timeout: float = 10.0, max_bytes: int = 20 * 2**20, allow_private: bool = False) -> bytes:
    """The body of `url`, or FetchError (unreachable, too large, refused address, bad status)."""
    _check_host(url, allow_private)
    opener = urllib.request.build_opener(_CheckedRedirects(allow_private))
    request = urllib.request.Request(url, headers={"User-Agent": "herd-image-fetch"})
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"the image at {url} is {int(declared)} bytes; the limit is {max_bytes}")
            body = response.read(max_bytes + 1)
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        raise FetchError(f"fetching {url} failed with HTTP {e.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(f"cannot fetch {url}: {reason}") from None
    if len(body) > max_bytes:
        raise FetchError(f"the image at {url} is larger than the limit of {max_bytes} bytes")
    return body
