"""The Batches API: create, retrieve, cancel, list, in OpenAI's Batch shape, or in together's
(create -> {"job": ...}, list -> a bare array, upper-case statuses, ISO times, progress 0-100)
for together's SDKs. The work itself is the batch runner's (herd/server/batch_runner.py)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from herd.server.batch_lines import ENDPOINTS
from herd.server.batch_service import batch_service, caller_key, is_together
from herd.server.errors import APIError, bad_request, parse_json_body
from herd.server.routes.common import page_limit, require_json

router = APIRouter()

_TOGETHER_STATUS = {
    "validating": "VALIDATING", "in_progress": "IN_PROGRESS", "finalizing": "IN_PROGRESS",
    "completed": "COMPLETED", "failed": "FAILED", "expired": "EXPIRED", "cancelling": "CANCELING",
    "cancelled": "CANCELLED",
}


def _int(t: float | None) -> int | None:
    return None if t is None else int(t)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def openai_batch(b) -> dict[str, Any]:
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": None if not b.errors else {"object": "list", "data": b.errors},
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": int(b.created_at),
        "expires_at": int(b.expires_at),
        **{name: _int(t) for name, t in b.times.items()},
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.metadata,
        "model": b.model,
        "usage": {
            "input_tokens": b.prompt_tokens,
            "input_tokens_details": {"cached_tokens": b.cached_tokens},
            "output_tokens": b.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": b.prompt_tokens + b.completion_tokens,
        },
    }


def together_job(b, file_bytes: int | None) -> dict[str, Any]:
    done = b.completed + b.failed
    ended = b.times.get(f"{b.status}_at") if b.status in ("completed", "failed", "expired", "cancelled") else None
    return {
        "id": b.id,
        "user_id": "" if b.key_id is None else str(b.key_id),
        "input_file_id": b.input_file_id,
        "file_size_bytes": file_bytes or 0,
        "status": _TOGETHER_STATUS[b.status],
        "job_deadline": _iso(b.expires_at),
        "created_at": _iso(b.created_at),
        "completed_at": _iso(ended),
        "endpoint": b.endpoint,
        "progress": 100.0 if b.status == "completed" else (100.0 * done / b.total if b.total else 0.0),
        "model_id": b.model,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "error": "; ".join(e["message"] for e in b.errors) if b.errors else None,
    }


async def _render(request: Request, b) -> dict[str, Any]:
    if not is_together(request):
        return openai_batch(b)
    svc = batch_service(request)
    rec = await asyncio.to_thread(svc.files.get, b.input_file_id, b.key_id)
    return together_job(b, None if rec is None else rec.bytes)


def _not_found(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")


def _check_metadata(metadata) -> dict | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16 or any(
        not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512 for k, v in metadata.items()
    ):
        raise bad_request("metadata must be at most 16 string pairs (keys up to 64 characters, values up to 512)",
                          param="metadata")
    return metadata


@router.post("/batches")
async def create_batch(request: Request) -> Response:
    from herd.platform.files import BATCH_PURPOSES

    svc = batch_service(request)
    key_id = caller_key(request)
    require_json(request)
    data = parse_json_body(await request.body())
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    input_file_id, endpoint = data.get("input_file_id"), data.get("endpoint")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise bad_request("input_file_id is required", param="input_file_id")
    if endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint must be one of {list(ENDPOINTS)}", param="endpoint")
    window = data.get("completion_window") or "24h"  # together's SDK may leave it out
    if window != "24h":
        raise bad_request("completion_window must be 24h", param="completion_window")
    metadata = _check_metadata(data.get("metadata"))
    model = data.get("model_id")
    if model is not None and model not in svc.runner.st.model_names:
        raise APIError(404, f"The model `{model}` does not exist", param="model_id", code="model_not_found")
    rec = await asyncio.to_thread(svc.files.get, input_file_id, key_id)
    if rec is None or rec.status == "pending":
        raise APIError(404, f"No such File object: {input_file_id}", param="input_file_id", code="file_not_found")
    if rec.purpose not in BATCH_PURPOSES:
        raise bad_request(f"the input file's purpose is {rec.purpose!r}; upload it with purpose 'batch'",
                          param="input_file_id")
    b = await asyncio.to_thread(svc.batches.create, key_id, endpoint=endpoint, input_file_id=input_file_id,
                                completion_window=window, metadata=metadata, model=model)
    svc.runner.notify()
    body = await _render(request, b)
    return JSONResponse({"job": body, "warning": None} if is_together(request) else body)


@router.get("/batches")
async def list_batches(request: Request) -> Response:
    svc = batch_service(request)
    q = request.query_params
    limit = page_limit(request, 20, 100)
    records, has_more = await asyncio.to_thread(svc.batches.list, caller_key(request), after=q.get("after"),
                                                limit=limit)
    data = [await _render(request, b) for b in records]
    if is_together(request):
        return JSONResponse(data)
    return JSONResponse({"object": "list", "data": data, "has_more": has_more,
                         "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


@router.get("/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request) -> Response:
    svc = batch_service(request)
    b = await asyncio.to_thread(svc.batches.get, batch_id, caller_key(request))
    if b is None:
        raise _not_found(batch_id)
    return JSONResponse(await _render(request, b))


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request) -> Response:
    svc = batch_service(request)
    key_id = caller_key(request)
    b = await asyncio.to_thread(svc.batches.get, batch_id, key_id)
    if b is None:
        raise _not_found(batch_id)
    moved = await asyncio.to_thread(svc.batches.transition, batch_id, "cancelling",
                                    only_from=("validating", "in_progress"))
    if moved:
        svc.runner.cancel(batch_id)
    elif b.status not in ("cancelling", "cancelled"):
        raise APIError(409, f"the batch is {b.status}; only a validating or in-progress batch can be cancelled",
                       param="batch_id", code="batch_not_cancellable")
    b = await asyncio.to_thread(svc.batches.get, batch_id, key_id)
    return JSONResponse(await _render(request, b))
