"""One place that turns failures into OpenAI-shaped errors: {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("herd.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with an HTTP status, meant for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error() -> APIError:
    """A failure of herd's, not of the request: the details go to the log, never to the client
    (they name herd's code)."""
    return APIError(500, "internal server error; the server log has the details")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def loc_to_param(loc: tuple) -> str | None:
    """pydantic's error location -> a param name such as `messages[0].content`."""
    param = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in part or "-" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue  # pydantic names union members and validators in the location: not fields
        else:
            param += f".{part}" if param else part
    return param or None


def from_validation_error(e: ValidationError | RequestValidationError) -> APIError:
    errors = e.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    param = loc_to_param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if param:
        message = f"{param}: {message}"
    return bad_request(message, param=param)


def _same(obj: dict) -> dict:
    return obj


def parse_json_body(raw: bytes, *, share_gil: bool = False) -> Any:
    """Request bytes -> JSON, with a 400 for bytes that are not UTF-8 JSON.

    json.loads holds the GIL for the whole document (about a second for 300,000 small objects);
    with share_gil (for large bodies parsed in a worker thread) a Python hook runs after each
    object, and running Python code is where a thread gives the GIL up to the others."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, object_hook=_same if share_gil else None)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return from_validation_error(e).response()

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, e: ValidationError):
        return from_validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        if e.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        return APIError(e.status_code, message, headers=getattr(e, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return internal_error().response()
