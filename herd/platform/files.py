"""Uploaded files: bytes under a directory ($HERD_HOME/files by default), one file per id,
metadata in the platform database. Every lookup names the caller's key: a key sees only its own
files (None, the open server's caller, sees only files uploaded without a key).

Two ways in: `create` takes the bytes at once (OpenAI's multipart upload); `create_pending` +
`put_content` is together's 3-step upload, where the bytes arrive later on a PUT that carries no
API key, only the random token of the URL the server handed out (stored as its SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import delete, insert, select, update

from herd.platform.batch_schema import files
from herd.platform.db import Database

CHUNK = 1 << 20
BATCH_PURPOSES = ("batch", "batch-api")
# OpenAI's purposes and together's; outputs of batches are batch_output.
PURPOSES = frozenset(
    {"batch", "batch_output", "fine-tune", "assistants", "vision", "user_data", "evals",
     "batch-api", "eval", "eval-output"}
)


@dataclass(frozen=True)
class FileRecord:
    id: str
    key_id: int | None
    filename: str
    purpose: str
    bytes: int
    created_at: float
    expires_at: float | None
    status: str  # uploaded | processed | pending
    file_type: str
    checksum: str | None


class FileError(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def _record(r) -> FileRecord:
    return FileRecord(r.id, r.key_id, r.filename, r.purpose, r.bytes, r.created_at, r.expires_at, r.status,
                      r.file_type, r.checksum)


def _owner(key_id: int | None):
    return files.c.key_id.is_(None) if key_id is None else files.c.key_id == key_id


class FileStore:
    def __init__(self, db: Database, root: Path, *, max_bytes: int = 512 * 1024 * 1024, clock=time.time):
        self.db = db
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.clock = clock
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    # -- writing bytes ------------------------------------------------------------------------
    def _write(self, file_id: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Streams chunks to the file's path (via a temporary name, so a crash never leaves a
        half file under the id); returns (size, sha256 hex). Over max_bytes: FileError 413."""
        tmp = self.root / f".{file_id}.{secrets.token_hex(4)}.part"
        size, digest = 0, hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise FileError(f"the file is over {self.max_bytes} bytes", 413, "file_too_large", "file")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(file_id))
        finally:
            tmp.unlink(missing_ok=True)
        return size, digest.hexdigest()

    @staticmethod
    def chunks_of(f: BinaryIO) -> Iterable[bytes]:
        while chunk := f.read(CHUNK):
            yield chunk

    # -- the API --------------------------------------------------------------------------------
    def create(self, key_id: int | None, filename: str, purpose: str, chunks: Iterable[bytes], *,
               expires_at: float | None = None, file_id: str | None = None, status: str = "processed") -> FileRecord:
        check_purpose(purpose)
        file_id = file_id or new_file_id()
        size, digest = self._write(file_id, chunks)
        row = dict(id=file_id, key_id=key_id, filename=filename[:500], purpose=purpose, bytes=size,
                   created_at=self.clock(), expires_at=expires_at, status=status,
                   file_type=_file_type(filename), checksum=digest)
        with self.db.write() as conn:
            # A batch output written again after a crash replaces its earlier row.
            conn.execute(delete(files).where(files.c.id == file_id))
            conn.execute(insert(files).values(**row))
        return self.get(file_id, key_id)

    def create_pending(self, key_id: int | None, filename: str, purpose: str, file_type: str | None,
                       checksum: str | None) -> tuple[FileRecord, str]:
        """together's step 1: metadata only. Returns the record and the upload token."""
        check_purpose(purpose)
        token = secrets.token_urlsafe(32)
        file_id = new_file_id()
        with self.db.write() as conn:
            conn.execute(insert(files).values(
                id=file_id, key_id=key_id, filename=filename[:500], purpose=purpose, bytes=0,
                created_at=self.clock(), expires_at=None, status="pending",
                file_type=(file_type or _file_type(filename))[:16], checksum=(checksum or None) and checksum[:64],
                upload_token_hash=_hash(token),
            ))
        return self.get(file_id, key_id), token

    def put_content(self, file_id: str, token: str, chunks: Iterable[bytes]) -> FileRecord:
        """together's step 2: the bytes of a pending file, authorised by its upload token only."""
        with self.db.read() as conn:
            r = conn.execute(select(files).where(files.c.id == file_id)).first()
        if r is None or r.upload_token_hash is None or not hmac.compare_digest(r.upload_token_hash, _hash(token)):
            raise FileError("unknown upload URL", 404, "not_found")
        if r.status != "pending":
            raise FileError("this file's bytes were already uploaded", 409, "conflict")
        size, digest = self._write(file_id, chunks)
        if r.checksum and r.checksum.lower() != digest:
            self.path(file_id).unlink(missing_ok=True)
            raise FileError("the bytes do not match the checksum given at upload", 400, "checksum_mismatch")
        with self.db.write() as conn:
            conn.execute(update(files).where(files.c.id == file_id, files.c.status == "pending")
                         .values(bytes=size, checksum=digest, status="uploaded", upload_token_hash=None))
        return _record_of(self.db, file_id)

    def mark_processed(self, file_id: str, key_id: int | None) -> FileRecord:
        """together's step 3 (/preprocess)."""
        rec = self.get(file_id, key_id)
        if rec is None:
            raise FileError(f"no such file: {file_id}", 404, "not_found", "id")
        if rec.status == "pending":
            raise FileError("the file's bytes have not been uploaded yet", 400, "upload_incomplete")
        with self.db.write() as conn:
            conn.execute(update(files).where(files.c.id == file_id).values(status="processed"))
        return self.get(file_id, key_id)

    def get(self, file_id: str, key_id: int | None) -> FileRecord | None:
        with self.db.read() as conn:
            r = conn.execute(select(files).where(files.c.id == file_id, _owner(key_id))).first()
        return None if r is None else _record(r)

    def list(self, key_id: int | None, *, purpose: str | None = None, after: str | None = None, limit: int = 10000,
             order: str = "desc") -> tuple[list[FileRecord], bool]:
        """A page of the key's files (newest first by default) and whether more follow."""
        q = select(files).where(_owner(key_id), files.c.status != "pending")
        if purpose:
            q = q.where(files.c.purpose == purpose)
        newest_first = order != "asc"
        if after:
            anchor = self.get(after, key_id)
            if anchor is not None:
                cmp = (files.c.created_at, files.c.id)
                if newest_first:
                    q = q.where((cmp[0] < anchor.created_at) | ((cmp[0] == anchor.created_at) & (cmp[1] < anchor.id)))
                else:
                    q = q.where((cmp[0] > anchor.created_at) | ((cmp[0] == anchor.created_at) & (cmp[1] > anchor.id)))
        if newest_first:
            q = q.order_by(files.c.created_at.desc(), files.c.id.desc())
        else:
            q = q.order_by(files.c.created_at, files.c.id)
        with self.db.read() as conn:
            rows = conn.execute(q.limit(limit + 1)).all()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, file_id: str, key_id: int | None) -> bool:
        with self.db.write() as conn:
            gone = conn.execute(delete(files).where(files.c.id == file_id, _owner(key_id))).rowcount > 0
        if gone:
            self.path(file_id).unlink(missing_ok=True)
        return gone

    def expire(self) -> int:
        """Deletes files past their expires_at."""
        now = self.clock()
        with self.db.read() as conn:
            ids = [r.id for r in conn.execute(select(files.c.id).where(files.c.expires_at < now))]
        with self.db.write() as conn:
            for file_id in ids:
                conn.execute(delete(files).where(files.c.id == file_id))
        for file_id in ids:
            self.path(file_id).unlink(missing_ok=True)
        return len(ids)


def _record_of(db: Database, file_id: str) -> FileRecord:
    with db.read() as conn:
        return _record(conn.execute(select(files).where(files.c.id == file_id)).first())


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _file_type(filename: str) -> str:
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return ext if ext in ("jsonl", "json", "csv", "parquet", "txt") else "jsonl"


def check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise FileError(f"unknown purpose {purpose!r}; use one of {sorted(PURPOSES)}", 400, "invalid_purpose", "purpose")
