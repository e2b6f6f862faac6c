"""/openapi.json as herd really answers: request bodies from the pydantic models that validate
them, every status with the error shape, and the real content types (SSE streams, plain-text
metrics, the HTML playground, empty health answers).

The routes read their bodies themselves (so that errors are OpenAI-shaped and large bodies are
parsed off the event loop), which FastAPI cannot see; this table says what they take and give.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from herd.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

_REF = "#/components/schemas/{model}"

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_STATUS_TEXT = {
    400: "Invalid request (the error's `param` names the field)",
    401: "Missing or wrong API key",
    404: "No such model, file, batch or route",
    409: "The resource is not in a state that allows this",
    413: "The request body is over the server's limit",
    415: "The body is not application/json",
    429: "Rate limited (see Retry-After)",
    500: "Internal error",
    501: "Files and batches need the platform database (the server runs with --no-platform)",
    503: "Busy now or shutting down: retry after Retry-After seconds",
}
# Every operation may answer these: the key check, the body limit, rate limits, failures.
_ALWAYS = (400, 401, 413, 429, 500, 503)  # 400: a malformed Content-Length
_JSON_BODY = (400, 404, 415)  # and these where a JSON body is read


def _object(*required: str, **properties: Any) -> dict:
    return {"type": "object", "required": list(required), "properties": properties}


_CHOICES = {"type": "array", "items": {"type": "object"}}
_USAGE = {"type": ["object", "null"]}
COMPLETION_SCHEMA = _object("id", "object", "created", "model", "choices", id={"type": "string"},
                            object={"type": "string"}, created={"type": "integer"}, model={"type": "string"},
                            choices=_CHOICES, usage=_USAGE)
MODEL_SCHEMA = _object("id", "object", "created", "owned_by", id={"type": "string"}, object={"type": "string"},
                       created={"type": "integer"}, owned_by={"type": "string"})
MODEL_LIST_SCHEMA = {
    "oneOf": [
        _object("object", "data", object={"type": "string"}, data={"type": "array", "items": MODEL_SCHEMA}),
        {"type": "array", "items": MODEL_SCHEMA},  # together 2.x clients (by User-Agent)
    ]
}
SSE = {"text/event-stream": {"schema": {"type": "string"},
                             "example": 'data: {"object": "chat.completion.chunk", ...}\n\ndata: [DONE]\n\n'}}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _ok(content: dict | None, description: str = "OK") -> dict:
    return {"description": description, **({"content": content} if content is not None else {})}


# (method, path under /v1 or at the root) -> (request body model or None, extra error statuses, 2xx responses)
_OPERATIONS: dict[tuple[str, str], tuple[type[BaseModel] | dict | None, tuple[int, ...], dict]] = {
    ("post", "/v1/chat/completions"): (ChatCompletionRequest, _JSON_BODY, {
        "200": _ok({**_json(COMPLETION_SCHEMA), **SSE}, "A chat completion, or its chunks as server-sent events")}),
    ("post", "/v1/completions"): (CompletionRequest, _JSON_BODY, {
        "200": _ok({**_json(COMPLETION_SCHEMA), **SSE}, "A completion, or its chunks as server-sent events")}),
    ("get", "/v1/models"): (None, (), {"200": _ok(_json(MODEL_LIST_SCHEMA))}),
    ("get", "/v1/models/{model_id}"): (None, (400, 404), {"200": _ok(_json(MODEL_SCHEMA))}),
    ("post", "/v1/tokenize"): (TokenizeRequest, _JSON_BODY, {"200": _ok(_json(_object(
        "count", "max_model_len", "tokens", count={"type": "integer"}, max_model_len={"type": "integer"},
        tokens={"type": "array", "items": {"type": "integer"}})))}),
    ("post", "/v1/detokenize"): (DetokenizeRequest, _JSON_BODY, {
        "200": _ok(_json(_object("prompt", prompt={"type": "string"})))}),
    ("get", "/health"): (None, (), {"200": _ok(None, "The engine is running (empty body)")}),
    ("get", "/ping"): (None, (), {"200": _ok(None, "The engine is running (empty body)")}),
    ("get", "/playground"): (None, (), {"200": _ok({"text/html": {"schema": {"type": "string"}}}, "The web playground")}),
    ("get", "/"): (None, (), {"307": {"description": "Redirect to /playground"}}),
    ("get", "/version"): (None, (), {"200": _ok(_json(_object("version", version={"type": "string"})))}),
    ("get", "/metrics"): (None, (), {"200": _ok({"text/plain": {"schema": {"type": "string"}}}, "Prometheus metrics")}),
    # Files and batches (OpenAI's and together's shapes): bodies as their routes read them.
    ("post", "/v1/files"): ({"multipart/form-data": {"schema": _object(
        "purpose", file={"type": "string", "format": "binary"}, purpose={"type": "string"},
        file_name={"type": "string"}, file_type={"type": "string"})}}, (400, 415), {
        "200": _ok(_json({"type": "object"}), "The file object"),
        "302": {"description": "together 3.x: upload the bytes to Location (PUT), then preprocess"}}),
    ("put", "/v1/files/{file_id}/content"): ({"application/octet-stream": {"schema": {
        "type": "string", "format": "binary"}}}, (400, 404, 409), {"200": _ok(_json({"type": "object"}))}),
    ("get", "/v1/files/{file_id}/content"): (None, (400, 404), {
        "200": _ok({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})}),
    ("post", "/v1/batches"): (_json(_object(
        "input_file_id", "endpoint", input_file_id={"type": "string"}, endpoint={"type": "string"},
        completion_window={"type": "string"}, metadata={"type": ["object", "null"]})), _JSON_BODY, {
        "200": _ok(_json({"type": "object"}), "The batch (together: wrapped as {job})")}),
}


def _schema_of(model: type[BaseModel], components: dict) -> dict:
    schema = model.model_json_schema(ref_template=_REF)
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def build(app: FastAPI) -> dict:
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # validation failures are 400s, not 422s
        components.pop(name, None)
    components["Error"] = ERROR_SCHEMA
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            described = _OPERATIONS.get((method, path)) or _OPERATIONS.get((method, "/v1" + path))  # /tokenize too
            body, extra, success = described or (None, (400, 404) if "{" in path else (), None)
            if path.startswith(("/v1/files", "/v1/batches")):
                extra = (*extra, 501)
            if body is not None:
                content = (_json(_schema_of(body, components)) if isinstance(body, type) else body)
                op["requestBody"] = {"required": True, "content": content}
            responses = dict(success or {"200": _ok(_json({}))})
            if success is None and "200" in op.get("responses", {}):  # routes FastAPI describes itself
                responses["200"] = op["responses"]["200"]
            for status in sorted({*_ALWAYS, *extra}):
                responses[str(status)] = {"description": _STATUS_TEXT[status],
                                          "content": _json({"$ref": _REF.format(model="Error")})}
            op["responses"] = responses
    return spec


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi
