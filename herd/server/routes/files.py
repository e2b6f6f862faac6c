"""The Files API: OpenAI's (multipart upload, list, retrieve, content, delete) and together's
3-step upload on the same POST /v1/files route (a form with `file_name` and no `file` part:
302 to a one-time PUT URL, then POST /v1/files/{id}/preprocess). Each key sees only its own files."""

from __future__ import annotations

import asyncio
import tempfile
import time

from fastapi import APIRouter
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from herd.server.batch_service import batch_service, caller_key, is_together
from herd.server.errors import APIError, bad_request
from herd.server.routes.common import page_limit

router = APIRouter()

BATCH_FILE_TTL = 30 * 24 * 3600  # OpenAI: batch files expire after 30 days unless told otherwise
SPOOL_BYTES = 8 * 1024 * 1024


def file_object(rec, together: bool = False) -> dict:
    """OpenAI's FileObject with together's extra fields (FileType, processing status)."""
    purpose = rec.purpose
    if together and purpose in ("batch", "batch_output"):
        purpose = "batch-api"  # together 1.x validates purposes against its own list
    return {
        "id": rec.id,
        "object": "file",
        "bytes": rec.bytes,
        "created_at": int(rec.created_at),
        "filename": rec.filename,
        "purpose": purpose,
        "status": "processed" if rec.status == "processed" else "uploaded",
        "expires_at": None if rec.expires_at is None else int(rec.expires_at),
        "status_details": None,
        "FileType": rec.file_type,
        "Processed": rec.status == "processed",
        "processing_status": "COMPLETED" if rec.status == "processed" else "PENDING",
    }


def _not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found")


def _file_error(e) -> APIError:
    return APIError(e.status, e.message, param=e.param, code=e.code)


@router.post("/files")
async def create_file(request: Request) -> Response:
    from herd.platform.files import FileError

    svc = batch_service(request)
    key_id = caller_key(request)
    try:
        form = await request.form(max_files=1, max_fields=20)
    except Exception as e:  # not a form, or a malformed one
        raise bad_request(f"send the file as multipart/form-data with `file` and `purpose` ({e})") from None
    try:
        purpose = str(form.get("purpose") or "")
        if not purpose:
            raise bad_request("`purpose` is required", param="purpose")
        upload = form.get("file")
        if isinstance(upload, UploadFile):
            expires_at = _expires_at(form, purpose)
            filename = upload.filename or "upload.jsonl"
            rec = await asyncio.to_thread(
                svc.files.create, key_id, filename, purpose, svc.files.chunks_of(upload.file), expires_at=expires_at
            )
            return JSONResponse(file_object(rec, is_together(request)))
        if form.get("file_name"):
            # together step 1: no bytes yet; they go to the returned URL, without the API key.
            rec, token = await asyncio.to_thread(
                svc.files.create_pending, key_id, str(form["file_name"]), purpose,
                str(form.get("file_type") or "") or None, str(form.get("checksum") or "") or None,
            )
            base = str(request.base_url).rstrip("/")
            location = f"{base}/v1/files/{rec.id}/content?upload_token={token}"
            return Response(status_code=302, headers={"Location": location, "X-Together-File-Id": rec.id})
        raise bad_request("a multipart `file` part is required", param="file")
    except FileError as e:
        raise _file_error(e) from None
    finally:
        await form.close()


def _expires_at(form, purpose: str) -> float | None:
    anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
    now = time.time()
    if seconds is not None:
        if anchor not in (None, "created_at"):
            raise bad_request("expires_after[anchor] must be created_at", param="expires_after")
        try:
            s = int(str(seconds))
        except ValueError:
            raise bad_request("expires_after[seconds] must be an integer", param="expires_after") from None
        if not 3600 <= s <= 2_592_000:
            raise bad_request("expires_after[seconds] must be in [3600, 2592000]", param="expires_after")
        return now + s
    return now + BATCH_FILE_TTL if purpose == "batch" else None


@router.put("/files/{file_id}/content")
async def upload_content(file_id: str, request: Request) -> Response:
    """together step 2: the bytes, authorised by the URL's token (no API key is sent)."""
    from herd.platform.files import FileError

    svc = batch_service(request)
    token = request.query_params.get("upload_token") or ""
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
        async for chunk in request.stream():
            spool.write(chunk)
        spool.seek(0)
        try:
            rec = await asyncio.to_thread(svc.files.put_content, file_id, token, svc.files.chunks_of(spool))
        except FileError as e:
            raise _file_error(e) from None
    return JSONResponse(file_object(rec, True), status_code=200)


@router.post("/files/{file_id}/preprocess")
async def preprocess(file_id: str, request: Request) -> Response:
    """together step 3."""
    from herd.platform.files import FileError

    svc = batch_service(request)
    try:
        rec = await asyncio.to_thread(svc.files.mark_processed, file_id, caller_key(request))
    except FileError as e:
        raise _file_error(e) from None
    return JSONResponse(file_object(rec, is_together(request)))


@router.get("/files")
async def list_files(request: Request) -> Response:
    svc = batch_service(request)
    q = request.query_params
    limit = page_limit(request, 10000, 10000)
    order = q.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise bad_request("order must be asc or desc", param="order")
    records, has_more = await asyncio.to_thread(
        svc.files.list, caller_key(request), purpose=q.get("purpose"), after=q.get("after"), limit=limit, order=order
    )
    together = is_together(request)
    data = [file_object(r, together) for r in records]
    return JSONResponse({
        "object": "list", "data": data, "has_more": has_more,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    })


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, request: Request) -> Response:
    svc = batch_service(request)
    rec = await asyncio.to_thread(svc.files.get, file_id, caller_key(request))
    if rec is None or rec.status == "pending":
        raise _not_found(file_id)
    return JSONResponse(file_object(rec, is_together(request)))


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request) -> Response:
    svc = batch_service(request)
    rec = await asyncio.to_thread(svc.files.get, file_id, caller_key(request))
    path = svc.files.path(file_id)
    if rec is None or rec.status == "pending" or not path.is_file():
        raise _not_found(file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=rec.filename)


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request) -> Response:
    svc = batch_service(request)
    key_id = caller_key(request)
    if await asyncio.to_thread(svc.files.get, file_id, key_id) is None:
        raise _not_found(file_id)
    user = await asyncio.to_thread(svc.batches.uses_file, file_id)
    if user is not None:
        raise APIError(409, f"the file is the input of batch {user}, which is still running; cancel it first",
                       param="id", code="file_in_use")
    await asyncio.to_thread(svc.files.delete, file_id, key_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
