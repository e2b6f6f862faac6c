"""What the routes share: body parsing, usage, SSE framing."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from herd.server.errors import APIError, bad_request, internal_error, from_validation_error, parse_json_body
from herd.server.state import ServerState

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger("herd.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def state_of(request: Request) -> ServerState:
    return request.app.state.herd


def require_json(request: Request) -> None:
    """JSON routes take `application/json` bodies only (any parameters, such as a charset).
    Without this, a web page could drive the API cross-site: browsers send text/plain, form and
    multipart bodies (and bodies with no type) without asking the server first (no preflight)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"the request body must be application/json; got {media_type or 'no Content-Type'}",
            code="unsupported_media_type",
        )


# Bodies larger than this are parsed and validated in a worker thread (a large body takes
# tens of milliseconds or more; the event loop must keep serving the other clients meanwhile).
LARGE_BODY_BYTES = 256 * 1024


def page_limit(request: Request, default: int, maximum: int) -> int:
    """The `limit` query parameter of a list route: an integer in [1, maximum], else a 400."""
    raw = request.query_params.get("limit")
    try:
        limit = int(raw or default)
    except ValueError:
        raise bad_request("limit must be an integer", param="limit") from None
    if not 1 <= limit <= maximum:
        raise bad_request(f"limit must be in [1, {maximum}]", param="limit")
    return limit


async def parse_body(request: Request, model: type[M], max_items: dict[str, int] | None = None) -> M:
    """The JSON body as `model`. `max_items` caps the length of top-level list fields, checked
    before the (GIL-holding) validation of their items: a request whose list can never fit (more
    messages than the context has tokens) is refused cheaply."""
    require_json(request)
    raw = await request.body()
    if len(raw) <= LARGE_BODY_BYTES:
        return _validate(parse_json_body(raw), model, max_items)
    return await asyncio.to_thread(lambda: _validate(parse_json_body(raw, share_gil=True), model, max_items))


def _validate(data: Any, model: type[M], max_items: dict[str, int] | None) -> M:
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    for name, limit in (max_items or {}).items():
        value = data.get(name)
        if isinstance(value, list) and len(value) > limit:
            raise bad_request(f"{name} has {len(value)} items; at most {limit} are allowed", param=name)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage plus Together's top-level cached_tokens."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cached_tokens": cached_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: BaseException) -> str:
    """An error after the stream began: `data: {"error": {...}}` (both SDKs raise on it)."""
    if not isinstance(e, APIError):
        log.error("a stream failed", exc_info=e)
        e = internal_error()
    return sse(e.body())
