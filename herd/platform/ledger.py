"""The usage and cost ledger: exactly one row per request id.

A request's row is written at admission (status `running`, with its prompt tokens and token
reservation) and completed at the end, committed before the response's last bytes go out
(`finished`, `aborted` or `failed`, with real usage and cost). Both writes are idempotent: a second
`begin` is ignored, and `end` only completes a row that is still open, so retrying a write never
double-bills. Rows still `running` when a server starts were cut off by a crash; `recover` marks
them `aborted`, billed for their prompt. Where several servers share one database, a starting one
may thus recover a row that another still serves: that server's `end` then still completes the
row (a recovered row counts as open, once).

On a server these writes go through the platform's database worker (herd.platform.worker), many
requests' rows to one transaction; `begin_in`/`end_in` run inside such a transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone

from sqlalchemy import Connection, and_, case, func, select, update

from herd.platform.config import PlatformConfig
from herd.platform.db import Database
from herd.platform.schema import api_keys, usage

STATUSES = ("finished", "aborted", "failed")


def utc_day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


@dataclass
class UsageRecord:
    request_id: str
    model: str
    key_id: int | None = None
    path: str = "/v1/chat/completions"
    status: str = "running"
    created_at: float = 0.0
    latency_s: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reserved_tokens: int = 0
    images: int = 0
    cost_usd: float = 0.0
    retry_count: int = 0
    http_status: int | None = None
    response_id: str | None = None
    error: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def row(self) -> dict:
        d = {k: getattr(self, k) for k in _RECORD_FIELDS}
        d["day"] = utc_day(self.created_at)
        if d["error"] is not None:
            d["error"] = d["error"][:500]
        return d


_RECORD_FIELDS = [f.name for f in fields(UsageRecord)]
# What `end` may change in a row `begin` wrote (not who, when or which request).
_FINAL_FIELDS = [k for k in _RECORD_FIELDS if k not in ("request_id", "created_at", "key_id")]
RECOVERED_ERROR = "the server stopped while the request ran"


class Ledger:
    def __init__(self, db: Database, config: PlatformConfig | None = None):
        self.db = db
        self.config = config or PlatformConfig()
        self._begin_sql = self._end_sql = None

    def _statements(self) -> tuple[str, str]:
        """The two request-path statements, as driver SQL (built once; see Database.cursor)."""
        if self._begin_sql is None:
            cols = _RECORD_FIELDS + ["day"]
            insert = f"INSERT INTO usage ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
            self._begin_sql = self.db.driver_sql(f"{insert} ON CONFLICT (request_id) DO NOTHING RETURNING request_id")
            final = ", ".join(f"{c} = excluded.{c}" for c in _FINAL_FIELDS)
            # A row that a starting server recovered as aborted while this one still served it
            # (several servers on one database) is completed with what really happened.
            self._end_sql = self.db.driver_sql(
                f"{insert} ON CONFLICT (request_id) DO UPDATE SET {final} WHERE usage.status = 'running' "
                f"OR (usage.status = 'aborted' AND usage.error = :recovered) RETURNING request_id"
            )
        return self._begin_sql, self._end_sql

    def begin_in(self, conn: Connection, rec: UsageRecord) -> bool:
        """`begin` inside the caller's write transaction."""
        if not rec.created_at:
            rec.created_at = time.time()
        rec.status = "running"
        cur = self.db.cursor(conn)
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT.
        cur.execute(self._statements()[0], rec.row())
        return cur.fetchone() is not None

    def end_in(self, conn: Connection, rec: UsageRecord) -> bool:
        """`end` inside the caller's write transaction."""
        if rec.status not in STATUSES:
            raise ValueError(f"a request ends finished, aborted or failed, not {rec.status!r}")
        if not rec.created_at:
            rec.created_at = time.time()
        rec.cost_usd = self.config.price_for(rec.model).cost(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)
        cur = self.db.cursor(conn)
        cur.execute(self._statements()[1], {**rec.row(), "recovered": RECOVERED_ERROR})
        return cur.fetchone() is not None

    def begin(self, rec: UsageRecord) -> bool:
        """Records an admitted request as running. False when its id is already there."""
        with self.db.write() as conn:
            return self.begin_in(conn, rec)

    def end(self, rec: UsageRecord) -> bool:
        """Completes the request's row (inserting it when `begin` never ran) with its final status,
        usage and cost. False when the row had already been completed: nothing changes then."""
        with self.db.write() as conn:
            return self.end_in(conn, rec)

    def get(self, request_id: str) -> UsageRecord | None:
        with self.db.read() as conn:
            r = conn.execute(select(usage).where(usage.c.request_id == request_id)).mappings().first()
        return None if r is None else UsageRecord(**{k: r[k] for k in _RECORD_FIELDS})

    def records(self, *, key_id: int | None = None, limit: int | None = None) -> list[UsageRecord]:
        q = select(usage).order_by(usage.c.created_at, usage.c.request_id)
        if key_id is not None:
            q = q.where(usage.c.key_id == key_id)
        if limit is not None:
            q = q.limit(limit)
        with self.db.read() as conn:
            return [UsageRecord(**{k: r[k] for k in _RECORD_FIELDS}) for r in conn.execute(q).mappings()]

    def recover(self, before: float | None = None) -> int:
        """Marks rows still `running` (admitted before `before`, default now) as aborted: their
        server died with them in flight. Call once at server start, before serving."""
        before = time.time() if before is None else before
        with self.db.write() as conn:
            rows = conn.execute(
                select(usage.c.request_id, usage.c.model, usage.c.prompt_tokens, usage.c.cached_tokens)
                .where(usage.c.status == "running", usage.c.created_at < before)
            ).all()
            for r in rows:
                cost = self.config.price_for(r.model).cost(r.prompt_tokens, 0, r.cached_tokens)
                conn.execute(
                    update(usage)
                    .where(usage.c.request_id == r.request_id, usage.c.status == "running")
                    .values(status="aborted", cost_usd=cost, error=RECOVERED_ERROR)
                )
        return len(rows)

    # -- summaries --------------------------------------------------------------------------
    def summary(
        self, *, key_id: int | None = None, since: str | None = None, until: str | None = None,
        by: tuple[str, ...] = ("key", "model", "day"),
    ) -> list[dict]:
        """Totals of ended requests grouped by any of key, model and day (UTC dates, inclusive
        `since`/`until` as YYYY-MM-DD), with cost and the model's prices (blended 3:1)."""
        unknown = set(by) - {"key", "model", "day"}
        if unknown:
            raise ValueError(f"cannot group usage by {sorted(unknown)}")
        group = []
        cols = []
        if "key" in by:
            group += [usage.c.key_id, api_keys.c.name]
            cols += [usage.c.key_id.label("key_id"), api_keys.c.name.label("key_name")]
        if "model" in by:
            group.append(usage.c.model)
            cols.append(usage.c.model.label("model"))
        if "day" in by:
            group.append(usage.c.day)
            cols.append(usage.c.day.label("day"))

        def count(status):
            return func.sum(case((usage.c.status == status, 1), else_=0)).label(status)

        q = (
            select(
                *cols,
                func.count().label("requests"),
                count("finished"), count("aborted"), count("failed"),
                func.sum(case((usage.c.retry_count > 0, 1), else_=0)).label("retries"),
                func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
                func.sum(usage.c.cached_tokens).label("cached_tokens"),
                func.sum(usage.c.completion_tokens).label("completion_tokens"),
                func.sum(usage.c.images).label("images"),
                func.sum(usage.c.cost_usd).label("cost_usd"),
                # Batch-API lines (also counted above), shown apart: they are billed at a discount.
                func.sum(case((usage.c.batch, 1), else_=0)).label("batch_requests"),
                func.sum(case((usage.c.batch, usage.c.prompt_tokens + usage.c.completion_tokens), else_=0))
                .label("batch_tokens"),
                func.sum(case((usage.c.batch, usage.c.cost_usd), else_=0.0)).label("batch_cost_usd"),
            )
            .select_from(usage.outerjoin(api_keys, usage.c.key_id == api_keys.c.id))
            .where(usage.c.status != "running")
            .group_by(*group)
            .order_by(*group)
        )
        conds = []
        if key_id is not None:
            conds.append(usage.c.key_id == key_id)
        if since:
            conds.append(usage.c.day >= since)
        if until:
            conds.append(usage.c.day <= until)
        if conds:
            q = q.where(and_(*conds))
        with self.db.read() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        out = []
        for r in rows:
            for k in ("requests", "finished", "aborted", "failed", "retries", "prompt_tokens", "cached_tokens",
                      "completion_tokens", "images", "batch_requests", "batch_tokens"):
                r[k] = int(r[k] or 0)
            r["cost_usd"] = round(float(r["cost_usd"] or 0.0), 10)
            r["batch_cost_usd"] = round(float(r["batch_cost_usd"] or 0.0), 10)
            r["total_tokens"] = r["prompt_tokens"] + r["completion_tokens"]
            if "model" in r:
                price = self.config.price_for(r["model"])
                r["price_per_1m"] = {"input": price.input, "output": price.output, "blended_3_1": round(price.blended, 6)}
            out.append(r)
        return out

