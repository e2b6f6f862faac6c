"""What the routes share: body parsing, usage, SSE framing."""

from __future__ import annotations

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


async def parse_body(request: Request, model: type[M]) -> M:
    require_json(request)
    data = parse_json_body(await request.body())
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
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
