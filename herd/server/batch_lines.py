"""Batch input lines: reading and validating a JSONL file, running one line through the same
code as the online routes, and the output line that records it. Shared by the server's batch
runner and the offline `herd batch run`.

Input lines are OpenAI's `{custom_id, method: "POST", url, body}` or together's `{custom_id,
body}` (the url is then the batch's endpoint). Output lines are OpenAI's `{id, custom_id,
response: {status_code, request_id, body}, error}`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from herd.server.errors import APIError, bad_request, from_validation_error

BATCH_PRIORITY = 1  # interactive requests run at 0 (lower runs sooner)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_ERRORS = 100  # validation errors reported per batch
MAX_CUSTOM_ID = 200


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line of the input file
    custom_id: str
    url: str
    body: dict


def _error(code: str, line: int | None, message: str, param: str | None = None) -> dict:
    return {"code": code, "line": line, "message": message, "param": param}


def read_lines(path: Path, endpoint: str, *, models: list[str] | None = None, max_lines: int = 50_000,
               any_endpoint: bool = False) -> tuple[list[Line], list[dict]]:
    """The file's lines, or the validation errors that fail the batch: bad JSON, a line that
    is not a request, a duplicate custom_id, a url other than the batch's endpoint, more than
    one model (or one not served: `models`), more than `max_lines` lines, an empty file.
    `any_endpoint`: a line's url may be any supported endpoint (offline runs)."""
    lines: list[Line] = []
    errors: list[dict] = []
    seen: dict[str, int] = {}
    first_model: tuple[str, int] | None = None
    count = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(errors) >= MAX_ERRORS:
                break
            if not raw.strip():
                continue
            count += 1
            if count > max_lines:
                errors.append(_error("too_many_tasks", number, f"the file has more than {max_lines} requests"))
                break
            try:
                item = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                errors.append(_error("invalid_json_line", number, f"line {number} is not valid JSON: {e}"))
                continue
            if not isinstance(item, dict):
                errors.append(_error("invalid_request", number, f"line {number} is not a JSON object"))
                continue
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
                errors.append(_error("invalid_request", number,
                                     f"line {number}: custom_id must be a non-empty string of at most "
                                     f"{MAX_CUSTOM_ID} characters", "custom_id"))
                continue
            if custom_id in seen:
                errors.append(_error("duplicate_custom_id", number,
                                     f"line {number}: custom_id {custom_id!r} is also on line {seen[custom_id]}",
                                     "custom_id"))
                continue
            seen[custom_id] = number
            url = item.get("url", endpoint)
            if url != endpoint and not (any_endpoint and url in ENDPOINTS):
                errors.append(_error("url_mismatch", number,
                                     f"line {number}: url {url!r} is not the batch's endpoint {endpoint!r}", "url"))
                continue
            method = item.get("method", "POST")
            if method != "POST":
                errors.append(_error("invalid_request", number, f"line {number}: method must be POST", "method"))
                continue
            body = item.get("body")
            if not isinstance(body, dict):
                errors.append(_error("invalid_request", number, f"line {number}: body must be a JSON object", "body"))
                continue
            model = body.get("model")
            if model is not None:
                if first_model is None:
                    first_model = (model, number)
                    if models is not None and model not in models:
                        errors.append(_error("model_not_found", number,
                                             f"line {number}: model {model!r} is not served here", "body.model"))
                        continue
                elif model != first_model[0]:
                    errors.append(_error("model_mismatch", number,
                                         f"line {number}: model {model!r} differs from {first_model[0]!r} on line "
                                         f"{first_model[1]}; a batch may use only one model", "body.model"))
                    continue
            lines.append(Line(number, custom_id, url, body))
    if not errors and not lines:
        errors.append(_error("empty_file", None, "the input file has no requests"))
    return lines, errors


async def run_line(st, url: str, body: dict, *, priority: int = BATCH_PRIORITY) -> tuple[int, dict]:
    """(status code, response body) of one line, computed exactly as the online route computes
    it. Errors come back as their status and OpenAI error body."""
    from herd.server.protocol import ChatCompletionRequest, CompletionRequest
    from herd.server.routes.chat import prepare_chat
    from herd.server.routes.completions import prepare_completion

    try:
        if body.get("stream"):
            raise bad_request("stream is not supported in a batch", param="stream")
        if url == "/v1/chat/completions":
            chat, _ = await prepare_chat(st, _validate(ChatCompletionRequest, body), priority=priority, admit=False)
            return 200, chat.response(await chat.final_output(None))
        if url == "/v1/completions":
            c, _ = await prepare_completion(st, _validate(CompletionRequest, body), priority=priority, admit=False)
            return 200, c.response(await c.run_all(None))
        raise bad_request(f"unsupported url {url!r}", param="url")
    except APIError as e:
        return e.status, e.body()


def _validate(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


def output_line(custom_id: str, status: int, body: dict | None, request_id: str | None,
                error: dict | None = None) -> dict:
    """OpenAI's output/error file line."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None if status == 0 else {"status_code": status, "request_id": request_id, "body": body},
        "error": error,
    }


def usage_of(body: dict | None) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of a response body."""
    u: dict[str, Any] = (body or {}).get("usage") or {}
    return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0), int(u.get("cached_tokens") or 0)
