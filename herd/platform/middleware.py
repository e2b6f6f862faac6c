"""The platform in a FastAPI app: `install(app, platform, model=...)`.

It adds one plain ASGI middleware (it never buffers a stream) that, for every path but the open
ones (/health, /ping, /version, /metrics) and CORS preflights:
  - authenticates `Authorization: Bearer <key>` (or `x-api-key`): 401 `invalid_api_key` in
    OpenAI's error shape; open while no key was ever created, unless `require_api_key`;
  - on POST .../chat/completions and .../completions: lets the route admit the request once its
    prompt is tokenized (herd.platform.meter.reserve: a request slot and prompt + max_tokens
    tokens, or 429 with `retry-after` when the key is over its requests or tokens per minute; a
    key known to be out of requests gets its 429 before the body is read), and writes the request's
    one ledger row at the end: finished, aborted (the client went away) or failed (an error
    status or a streamed error), committed before the response's last bytes ([DONE], or the
    body) go out;
  - puts Together's x-ratelimit-* / x-tokenlimit-* headers on every response to a keyed caller.
It also serves GET /v1/usage (the caller's own usage by model and day) and answers RateLimited
with 429. The routes report usage through herd.platform.meter.observe(out).

Nothing here blocks the event loop: key lookups are answered from a few seconds' cache (a miss
goes to a thread), and rate-limit decisions and ledger rows go through the platform's database
worker, which batches the waiting work of many requests into one transaction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse

from herd.platform.ledger import UsageRecord
from herd.platform.meter import _current
from herd.platform.ratelimit import Charge, RateLimited, Snapshot, lock_id
from herd.platform.service import AuthError, Caller, Platform
from herd.server.signed_upload import is_signed_upload

log = logging.getLogger("herd.platform")

OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/", "/playground"})  # exact paths
METERED_SUFFIXES = ("/chat/completions", "/completions")
USAGE_PATHS = ("/v1/usage", "/v1/v1/usage")


def _error_body(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


async def _reply(send, status: int, message: str, type_: str, code: str | None, headers: dict[str, str] | None = None):
    body = _error_body(message, type_, code)
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def rate_limited_response(e: RateLimited) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": e.message, "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}},
        status_code=429, headers=e.headers(),
    )


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return ""


class Meter:
    """One metered HTTP request: its rate-limit charge, what the engine reported, its ledger row.
    Its database work goes through the platform's worker (never on the event loop)."""

    def __init__(self, platform: Platform, caller: Caller, limits: tuple[int, int], *, model: str, path: str,
                 retry_count: int):
        self.platform = platform
        self.caller = caller
        self.charge: Charge | None = None  # set once admitted under the key's limits
        self.snapshot: Snapshot | None = None  # the key's window after this request's decision
        self.limits = limits
        self.request_id = uuid.uuid4().hex
        self.model = model
        self.path = path
        self.retry_count = retry_count
        self.created_at = platform.clock()
        self.started = time.monotonic()
        self.outputs: dict[str, tuple[int, int, int]] = {}  # engine request id -> (prompt, generated, cached)
        self.reserved = 0
        self.images = 0
        self.refused = False
        self.http_status: int | None = None
        self.stream_error: str | None = None
        self.engine_done = False  # the whole body is ready: usage is final
        self.done = False

    def _record(self, **kw) -> UsageRecord:
        return UsageRecord(
            request_id=self.request_id, model=self.model, key_id=self.caller.key_id, path=self.path,
            created_at=self.created_at, reserved_tokens=self.reserved, images=self.images,
            retry_count=self.retry_count, **kw,
        )

    # -- called by the route (herd.platform.meter.reserve) --------------------------------------
    async def reserve(self, prompt_tokens: int, max_tokens: int | None, *, n: int = 1, images: int = 0) -> None:
        p = self.platform
        tokens = p.reservation(prompt_tokens, max_tokens, n)
        self.reserved += tokens
        self.images += images
        # The admission row: it shows the request as aborted if the server dies under it. It is
        # written in the transaction that admits the request under the key's limits.
        record = self._record(prompt_tokens=prompt_tokens)
        key_id, (rpm, tpm) = self.caller.key_id, self.limits
        if key_id is None or not (rpm or tpm) or self.charge is not None:
            p.worker.post(lambda conn: p.ledger.begin_in(conn, record))
            return

        def admit_and_begin(conn):
            admitted = p.limiter.admit_in(conn, key_id, tokens, rpm, tpm)  # RateLimited: nothing written
            p.ledger.begin_in(conn, record)
            return admitted

        try:
            self.charge, self.snapshot = await p.worker.submit(admit_and_begin, lock=lock_id(key_id))
        except RateLimited as e:
            self.refused = True  # not admitted: no ledger row, no request counted
            self.snapshot = e.snapshot
            raise
        except Exception:
            log.exception("rate limiter unavailable; request %s admitted without a check", self.request_id)
            p.worker.post(lambda conn: p.ledger.begin_in(conn, record))

    # -- called by the middleware ----------------------------------------------------------------
    def status(self) -> str:
        s = self.http_status or 500
        if s == 499:
            return "aborted"
        if s >= 400 or self.stream_error is not None:
            return "failed"
        return "finished"

    def usage(self) -> tuple[int, int, int]:
        """(prompt, completion, cached) tokens over the request's engine requests so far."""
        outs = self.outputs.values()
        return sum(o[0] for o in outs), sum(o[1] for o in outs), sum(o[2] for o in outs)

    def headers(self) -> dict[str, str]:
        """Together's rate-limit headers as of this request's last decision (settled to real
        usage once the whole body is ready)."""
        if self.snapshot is None:
            return {}
        if self.engine_done and self.charge is not None:
            prompt, completion, _ = self.usage()
            return self.snapshot.settled(self.charge.tokens, prompt + completion).headers()
        return self.snapshot.headers()

    async def finish(self, status: str, error: str | None = None) -> None:
        """Completes the ledger row and settles the rate-limit charge to real usage, in one
        transaction that has committed when this returns (once)."""
        if self.done:
            return
        self.done = True
        if self.refused:
            return
        p = self.platform
        prompt, completion, cached = self.usage()
        record = self._record(
            status=status, latency_s=time.monotonic() - self.started, prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=completion, http_status=self.http_status,
            response_id=next(iter(self.outputs), None), error=error or self.stream_error,
        )
        charge = self.charge

        def settle_and_end(conn):
            if charge is not None:
                p.limiter.settle_in(conn, replace(charge), prompt + completion)  # a copy: this may run twice
            return p.ledger.end_in(conn, record)

        try:
            await p.worker.submit(settle_and_end)
        except Exception:
            log.exception("could not write the usage record of request %s: %s", self.request_id, record)


class PlatformMiddleware:
    def __init__(self, app, *, platform: Platform, model: str):
        self.app = app
        self.platform = platform
        self.model = model

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if is_signed_upload(scope):  # together's bytes PUT: its URL's token is checked by the route
            return await self.app(scope, receive, send)
        p = self.platform
        headers = scope.get("headers") or []
        auth = _header(headers, b"authorization")
        secret = auth[7:].strip() if auth[:7].lower() == "bearer " else _header(headers, b"x-api-key")
        caller = p.cached_caller(secret or None)  # a recent answer: no thread, no database
        if caller is None:
            try:
                caller = await asyncio.to_thread(p.authenticate, secret or None)
            except AuthError as e:
                caller = e
        if isinstance(caller, AuthError):
            return await _reply(send, 401, caller.message, "invalid_request_error", "invalid_api_key",
                                {"www-authenticate": "Bearer"})
        scope.setdefault("state", {})["herd_caller"] = caller
        limits = p.limits_for(caller)
        key_id = caller.key_id
        limited = key_id is not None and any(limits)

        path = scope["path"]
        if scope["method"] != "POST" or not path.endswith(METERED_SUFFIXES):
            async def send_with_headers(message):
                if message["type"] == "http.response.start" and limited:
                    try:
                        snap = await p.worker.submit(lambda conn: p.limiter.snapshot_in(conn, key_id, *limits))
                        message = _with_headers(message, snap.headers())
                    except Exception:
                        log.exception("could not read the rate-limit window of key %s", key_id)
                await send(message)

            return await self.app(scope, receive, send_with_headers)

        refusal = p.limiter.blocked(key_id) if limited else None
        if refusal is not None:  # out of requests until a known time: refused before its body is read
            return await _reply(send, 429, refusal.message, "rate_limit_error", "rate_limit_exceeded", refusal.headers())
        try:
            retries = min(max(int(_header(headers, b"x-stainless-retry-count") or 0), 0), 1_000_000)
        except ValueError:
            retries = 0
        meter = Meter(p, caller, limits, model=self.model, path=path, retry_count=retries)
        scope["state"]["herd_usage_id"] = meter.request_id
        token = _current.set(meter)

        async def metered_send(message):
            if message["type"] == "http.response.start":
                meter.http_status = message["status"]
                if not _header(message.get("headers", []), b"content-type").startswith("text/event-stream"):
                    meter.engine_done = True  # a whole body is ready: the headers show real usage
                message = _with_headers(message, meter.headers())
            elif message["type"] == "http.response.body" and not meter.done:
                body = message.get("body", b"")
                if body.startswith(b'data: {"error"'):
                    meter.stream_error = _stream_error(body)
                # The record is written before the last bytes: the body's end, or a stream's [DONE].
                if not message.get("more_body", False) or b"data: [DONE]" in body:
                    await meter.finish(meter.status())
            await send(message)

        try:
            await self.app(scope, receive, metered_send)
        except BaseException as e:
            if not meter.done:
                gone = isinstance(e, (asyncio.CancelledError, OSError)) or type(e).__name__ == "ClientDisconnect"
                status, error = ("aborted", "the client went away") if gone else ("failed", f"{type(e).__name__}: {e}")
                await asyncio.shield(meter.finish(status, error))
            raise
        else:
            if not meter.done:  # the response never completed: the client disconnected mid-stream
                await meter.finish("aborted", "the client went away")
        finally:
            _current.reset(token)


def _with_headers(message, extra: dict[str, str]):
    if not extra:
        return message
    pairs = [(k.encode(), v.encode()) for k, v in extra.items()]
    names = {k for k, _ in pairs}
    kept = [h for h in message.get("headers", []) if h[0].lower() not in names]
    return {**message, "headers": kept + pairs}


def _stream_error(body: bytes) -> str:
    try:
        return str(json.loads(body[len(b"data: "):].split(b"\n\n", 1)[0])["error"].get("message"))[:500]
    except Exception:
        return "error in stream"


def install(app, platform: Platform, *, model: str) -> Platform:
    """Mounts the platform on a FastAPI app (before the app's other middleware is added, so that
    request ids and body limits run first): recovers the ledger and rate windows, adds the
    middleware, the 429 handler and GET /v1/usage. `model` names the served model in the ledger."""
    platform.start()
    app.add_middleware(PlatformMiddleware, platform=platform, model=model)
    async def on_rate_limited(request, e: RateLimited):
        return rate_limited_response(e)

    app.add_exception_handler(RateLimited, on_rate_limited)

    async def usage(request: Request) -> JSONResponse:
        caller: Caller | None = request.scope.get("state", {}).get("herd_caller")
        since = request.query_params.get("since") or request.query_params.get("start_date")
        until = request.query_params.get("until") or request.query_params.get("end_date")
        key_id = caller.key_id if caller is not None else None
        try:
            rows = await asyncio.to_thread(
                platform.ledger.summary, key_id=key_id, since=since, until=until, by=("model", "day")
            )
        except ValueError as e:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                                           "code": None}}, status_code=400)
        key = None if caller is None or caller.key is None else {"id": caller.key.id, "name": caller.key.name}
        total = {
            k: sum(r[k] for r in rows)
            for k in ("requests", "finished", "aborted", "failed", "retries", "prompt_tokens", "cached_tokens",
                      "completion_tokens", "total_tokens", "images", "cost_usd", "batch_requests", "batch_tokens",
                      "batch_cost_usd")
        }
        total["cost_usd"] = round(total["cost_usd"], 10)
        total["batch_cost_usd"] = round(total["batch_cost_usd"], 10)
        return JSONResponse({"object": "usage", "key": key, "data": rows, "total": total})

    for path in USAGE_PATHS:
        app.add_api_route(path, usage, methods=["GET"], include_in_schema=path == USAGE_PATHS[0])
    return platform
