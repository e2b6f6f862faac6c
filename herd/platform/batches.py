"""Batches in the platform database: the batch rows (status, timestamps, errors, files) and one
result row per finished input line.

A line's result row and its ledger row (marked batch, priced at the batch discount) are written
in one transaction, so after a crash (kill -9) a line either has both or neither: the runner
re-runs exactly the lines without a result, and no line is billed twice.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from herd.platform.batch_schema import batch_results, batches
from herd.platform.db import Database
from herd.platform.schema import usage

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
WINDOW_SECONDS = {"24h": 24 * 3600}


@dataclass
class BatchRecord:
    id: str
    key_id: int | None
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    model: str | None
    metadata: dict | None
    errors: list[dict] | None
    total: int
    output_file_id: str | None
    error_file_id: str | None
    created_at: float
    expires_at: float
    times: dict[str, float | None] = field(default_factory=dict)  # in_progress_at ... cancelled_at
    completed: int = 0  # lines that succeeded
    failed: int = 0  # lines in the error file
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def _owner(key_id: int | None):
    return batches.c.key_id.is_(None) if key_id is None else batches.c.key_id == key_id


class BatchStore:
    def __init__(self, db: Database, clock=time.time):
        self.db = db
        self.clock = clock

    def _load(self, conn, rows) -> list[BatchRecord]:
        out = []
        for r in rows:
            counts = conn.execute(
                select(
                    func.sum(case((batch_results.c.ok, 1), else_=0)),
                    func.sum(case((batch_results.c.ok, 0), else_=1)),
                    func.sum(batch_results.c.prompt_tokens),
                    func.sum(batch_results.c.cached_tokens),
                    func.sum(batch_results.c.completion_tokens),
                ).where(batch_results.c.batch_id == r.id)
            ).first()
            out.append(BatchRecord(
                id=r.id, key_id=r.key_id, endpoint=r.endpoint, input_file_id=r.input_file_id,
                completion_window=r.completion_window, status=r.status, model=r.model,
                metadata=json.loads(r.metadata_json) if r.metadata_json else None,
                errors=json.loads(r.errors_json) if r.errors_json else None,
                total=r.total, output_file_id=r.output_file_id, error_file_id=r.error_file_id,
                created_at=r.created_at, expires_at=r.expires_at,
                times={t: getattr(r, t) for t in _TIMES},
                completed=int(counts[0] or 0), failed=int(counts[1] or 0), prompt_tokens=int(counts[2] or 0),
                cached_tokens=int(counts[3] or 0), completion_tokens=int(counts[4] or 0),
            ))
        return out

    # -- batches ------------------------------------------------------------------------------
    def create(self, key_id: int | None, *, endpoint: str, input_file_id: str, completion_window: str = "24h",
               metadata: dict | None = None, model: str | None = None) -> BatchRecord:
        now = self.clock()
        batch_id = new_batch_id()
        with self.db.write() as conn:
            conn.execute(insert(batches).values(
                id=batch_id, key_id=key_id, endpoint=endpoint, input_file_id=input_file_id,
                completion_window=completion_window, status="validating", model=model,
                metadata_json=json.dumps(metadata) if metadata else None, total=0,
                created_at=now, expires_at=now + WINDOW_SECONDS.get(completion_window, 24 * 3600),
            ))
        return self.get(batch_id, key_id)

    def get(self, batch_id: str, key_id: int | None) -> BatchRecord | None:
        with self.db.read() as conn:
            rows = conn.execute(select(batches).where(batches.c.id == batch_id, _owner(key_id))).all()
            found = self._load(conn, rows)
        return found[0] if found else None

    def get_any(self, batch_id: str) -> BatchRecord | None:
        """Whoever owns it (the runner's view)."""
        with self.db.read() as conn:
            found = self._load(conn, conn.execute(select(batches).where(batches.c.id == batch_id)).all())
        return found[0] if found else None

    def list(self, key_id: int | None, *, after: str | None = None, limit: int = 20) -> tuple[list[BatchRecord], bool]:
        """Newest first; `after` is the last id of the previous page."""
        q = select(batches).where(_owner(key_id))
        if after:
            with self.db.read() as conn:
                anchor = conn.execute(select(batches.c.created_at, batches.c.id)
                                      .where(batches.c.id == after, _owner(key_id))).first()
            if anchor is not None:
                q = q.where((batches.c.created_at < anchor.created_at)
                            | ((batches.c.created_at == anchor.created_at) & (batches.c.id < anchor.id)))
        q = q.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1)
        with self.db.read() as conn:
            rows = conn.execute(q).all()
            records = self._load(conn, rows[:limit])
        return records, len(rows) > limit

    def active_ids(self) -> list[str]:
        with self.db.read() as conn:
            return [r.id for r in conn.execute(
                select(batches.c.id).where(batches.c.status.in_(ACTIVE)).order_by(batches.c.created_at))]

    def uses_file(self, file_id: str) -> str | None:
        """An active batch reading this input file, if any."""
        with self.db.read() as conn:
            r = conn.execute(select(batches.c.id).where(batches.c.input_file_id == file_id,
                                                        batches.c.status.in_(ACTIVE))).first()
        return None if r is None else r.id

    def transition(self, batch_id: str, status: str, *, only_from: tuple[str, ...], **values: Any) -> bool:
        """Moves the batch to `status` (stamping `<status>_at`) if it is in one of `only_from`;
        False when it was not (someone else moved it first: cancel against completion)."""
        stamp = f"{status}_at"
        if stamp in _TIMES:
            values.setdefault(stamp, self.clock())
        if "errors" in values:
            values["errors_json"] = json.dumps(values.pop("errors"))
        with self.db.write() as conn:
            n = conn.execute(update(batches).where(batches.c.id == batch_id, batches.c.status.in_(only_from))
                             .values(status=status, **values)).rowcount
        return n > 0

    def update(self, batch_id: str, **values: Any) -> None:
        with self.db.write() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id).values(**values))

    # -- lines ---------------------------------------------------------------------------------
    def done_lines(self, batch_id: str) -> set[int]:
        with self.db.read() as conn:
            return {r.line for r in conn.execute(
                select(batch_results.c.line).where(batch_results.c.batch_id == batch_id))}

    def record_line(self, batch_id: str, line: int, custom_id: str, *, ok: bool, result: dict,
                    prompt_tokens: int = 0, cached_tokens: int = 0, completion_tokens: int = 0,
                    usage_row: dict | None = None) -> bool:
        """The line's result and its ledger row, together; False when the line already had a
        result (nothing is written then)."""
        try:
            with self.db.write() as conn:
                conn.execute(insert(batch_results).values(
                    batch_id=batch_id, line=line, custom_id=custom_id, ok=ok,
                    result_json=json.dumps(result, ensure_ascii=False, separators=(",", ":")),
                    prompt_tokens=prompt_tokens, cached_tokens=cached_tokens, completion_tokens=completion_tokens,
                ))
                if usage_row is not None:
                    conn.execute(insert(usage).values(**usage_row))
        except IntegrityError:
            return False
        return True

    def results(self, batch_id: str, ok: bool) -> list[str]:
        """The output (ok) or error lines, in input order."""
        with self.db.read() as conn:
            return [r.result_json for r in conn.execute(
                select(batch_results.c.result_json)
                .where(batch_results.c.batch_id == batch_id, batch_results.c.ok == ok)
                .order_by(batch_results.c.line))]
