"""Plain ASGI middleware (it must not buffer streams): X-Request-Id on every response, the API key,
and the request body size limit, enforced before anything parses the body."""

from __future__ import annotations

import hmac
import json
import re
import uuid

from herd.server.errors import APIError
from herd.server.signed_upload import is_signed_upload, is_upload

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_OPEN_PATHS = frozenset({"/health", "/version", "/metrics", "/ping", "/", "/playground"})  # exact paths only


def _error(status: int, message: str, code: str | None, request_id: str, param: str | None = None):
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                   "param": param, "code": code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode()), (b"connection", b"close")]
    return status, headers, body


_DRAIN_LIMIT = 64 * 1024 * 1024  # bodies up to this size are read to the end before a 413


async def _drain(receive) -> None:
    drained = 0
    while drained <= _DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body"):
            return


class HerdMiddleware:
    def __init__(self, app, *, max_body_bytes: int, api_key: str | None = None, max_upload_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max(max_upload_bytes or 0, max_body_bytes)  # file uploads (/v1/files)
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def reply(status, message, code, param=None, extra_headers=()):
            status, hdrs, body = _error(status, message, code, request_id, param)
            await send({"type": "http.response.start", "status": status, "headers": hdrs + list(extra_headers)})
            await send({"type": "http.response.body", "body": body})

        if (self.api_key and scope["method"] != "OPTIONS" and scope["path"] not in _OPEN_PATHS
                and not is_signed_upload(scope)):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:] if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await reply(401, "invalid API key", "invalid_api_key")

        limit = self.max_upload_bytes if is_upload(scope) else self.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await reply(400, "invalid Content-Length header", None)
            if too_big:
                # Read (and drop) a moderately large body first: a client still uploading when the
                # connection closes sees a reset instead of the 413 it should read.
                if int(length) <= _DRAIN_LIMIT:
                    await _drain(receive)
                return await reply(
                    413, f"the request body is {int(length)} bytes; this server takes at most {limit}",
                    "request_too_large",
                )

        received = 0

        async def limited_receive():
            # Bodies without Content-Length (chunked) are counted as they arrive.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body"):
                        await _drain(receive)  # as above: let the client finish sending
                    # Raised inside the app: its APIError handler answers 413.
                    raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
            return message

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                hdrs = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                hdrs.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": hdrs}
            await send(message)

        await self.app(scope, limited_receive, send_with_id)
