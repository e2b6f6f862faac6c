"""Per-key requests-per-minute and tokens-per-minute over a sliding window, kept in the platform
database, so that every API server process of a herd, and every herd sharing one PostgreSQL,
spends ONE budget per key.

A request is admitted once its prompt is tokenized (`admit`): it takes a request slot and
reserves prompt + max_tokens tokens (a request without max_tokens reserves the configured
default, not the whole context), or is refused with RateLimited (429) and counts nothing. When it
ends, its reservation is replaced by the tokens it really used (`settle`).

The window is cut into BUCKETS buckets (1 s of a 60 s window). Table rate_windows holds one row
per key per bucket: the requests admitted and tokens charged in it. A charge counts until the end
of its bucket has left the window: up to one bucket longer than an exact window, never shorter,
so a limit is never over-granted. A decision reads the key's live totals and adds to the current
bucket inside one write transaction that holds the key's lock (SQLite: the database's write lock,
BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock on the key), so two processes
deciding at once see each other's grants. A server that dies leaves its reservations in the table:
they count until they leave the window, as they should.

Since a request slot, once counted, only leaves with time, a key found out of requests stays so
until the `reset` its snapshot gives: `blocked` lets a server refuse such a key's requests
before reading their bodies, without asking the database.

Every decision has an `*_in(conn, ...)` form that runs inside a transaction the caller holds (the
platform's database worker batches many requests' decisions into one), and a plain form that opens
its own.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection

from herd.platform.db import Database

BUCKETS = 60  # per window
_PG_LOCK_CLASS = 0x68657264  # pg_advisory_xact_lock(class, hashtext(key)): "herd"

_TOTALS = (
    "SELECT MIN(CASE WHEN requests > 0 OR tokens > 0 THEN bucket END), SUM(requests), SUM(tokens) "
    "FROM rate_windows WHERE limit_key = :k AND bucket >= :first"
)
_BUCKETS = "SELECT bucket, tokens FROM rate_windows WHERE limit_key = :k AND bucket >= :first ORDER BY bucket"
_ADD = (
    "INSERT INTO rate_windows (limit_key, bucket, requests, tokens) VALUES (:k, :b, :r, :t) "
    "ON CONFLICT (limit_key, bucket) DO UPDATE SET requests = rate_windows.requests + :r, "
    "tokens = rate_windows.tokens + :t"
)
_PRUNE = "DELETE FROM rate_windows WHERE bucket < :first"
_PG_LOCK = f"SELECT pg_advisory_xact_lock({_PG_LOCK_CLASS}, :lock)"


def lock_id(key: object) -> int:
    """The advisory lock (PostgreSQL) that serialises decisions on `key`: a 32-bit number herd
    computes itself, so that a transaction deciding for several keys can take their locks in one
    order (DatabaseWorker sorts by it) and two such transactions never deadlock."""
    return zlib.crc32(str(key).encode()) - 2**31


@dataclass
class Charge:
    """One admitted request's place in its key's window."""

    key: str
    bucket: int
    tokens: int = 0
    settled: bool = False


@dataclass(frozen=True)
class Snapshot:
    """What the response headers report after a decision."""

    rpm: int  # 0: unlimited
    tpm: int
    requests_remaining: int
    tokens_remaining: int
    reset_s: float  # until the oldest charge leaves the window (0 when the window is empty)

    def headers(self) -> dict[str, str]:
        """Together's header set (limits of 0 mean unlimited and are left out)."""
        h: dict[str, str] = {}
        if self.rpm:
            h["x-ratelimit-limit"] = str(self.rpm)
            h["x-ratelimit-remaining"] = str(max(self.requests_remaining, 0))
            h["x-ratelimit-reset"] = str(math.ceil(self.reset_s))
        if self.tpm:
            h["x-tokenlimit-limit"] = str(self.tpm)
            h["x-tokenlimit-remaining"] = str(max(self.tokens_remaining, 0))
        return h

    def settled(self, reserved: int, used: int) -> Snapshot:
        """This snapshot after its request's reservation was replaced by the tokens it used."""
        if not self.tpm:
            return self
        return Snapshot(self.rpm, self.tpm, self.requests_remaining, self.tokens_remaining + reserved - used,
                        self.reset_s)


class RateLimited(Exception):
    """Over a limit: answer 429 with `retry_after` seconds and the snapshot's headers."""

    def __init__(self, message: str, retry_after: float, snapshot: Snapshot, kind: str):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.snapshot = snapshot
        self.kind = kind  # "requests" | "tokens"

    def headers(self) -> dict[str, str]:
        h = self.snapshot.headers()
        h["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        h["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        return h


class RateLimiter:
    def __init__(self, db: Database, window: float = 60.0, clock: Callable[[], float] = time.time):
        self.db = db
        self.window = float(window)
        self.bucket_s = self.window / BUCKETS
        self.clock = clock
        self._pruned_at = 0.0
        self._sql = {name: db.driver_sql(sql) for name, sql in
                     (("totals", _TOTALS), ("buckets", _BUCKETS), ("add", _ADD), ("prune", _PRUNE), ("lock", _PG_LOCK))}
        self._blocked: dict[str, tuple[float, Snapshot]] = {}  # key -> (out of requests until, snapshot)

    def _run(self, conn: Connection, name: str, params: dict):
        cur = self.db.cursor(conn)
        cur.execute(self._sql[name], params)
        return cur

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def _bucket(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    def _first_live(self, now: float) -> int:
        # Bucket b is live while its end, (b + 1) * bucket_s, is inside (now - window, now].
        return math.floor((now - self.window) / self.bucket_s)

    def _leaves_at(self, bucket: int) -> float:
        return (bucket + 1) * self.bucket_s + self.window

    def _totals(self, conn: Connection, key: str, now: float) -> tuple[int | None, int, int]:
        oldest, requests, tokens = self._run(conn, "totals", {"k": key, "first": self._first_live(now)}).fetchone()
        return (None if oldest is None else int(oldest)), int(requests or 0), int(tokens or 0)

    def _snapshot(self, key: str, totals, rpm: int, tpm: int, now: float) -> Snapshot:
        oldest, requests, tokens = totals
        reset = max(0.0, self._leaves_at(oldest) - now) if oldest is not None else 0.0
        snap = Snapshot(rpm, tpm, rpm - requests if rpm else 0, tpm - tokens if tpm else 0, reset)
        if rpm and requests >= rpm:
            self._blocked[key] = (now + reset, snap)
        return snap

    def _wait_for_tokens(self, conn: Connection, key: str, totals, need: int, tpm: int, now: float) -> float:
        """Seconds until `need` more tokens fit under `tpm`."""
        excess = totals[2] + need - tpm
        for bucket, tokens in self._run(conn, "buckets", {"k": key, "first": self._first_live(now)}).fetchall():
            excess -= int(tokens)
            if excess <= 0:
                return max(self._leaves_at(int(bucket)) - now, 0.001)
        return self.window

    # -- decisions inside a transaction --------------------------------------------------------
    def admit_in(self, conn: Connection, key: object, tokens: int, rpm: int, tpm: int, now: float | None = None
                 ) -> tuple[Charge, Snapshot]:
        """Admits one request that may use `tokens` under `rpm` and `tpm` (0: unlimited), or
        raises RateLimited and counts nothing."""
        now = self._now(now)
        key = str(key)
        if self.db.dialect == "postgresql":
            self._run(conn, "lock", {"lock": lock_id(key)})
        totals = self._totals(conn, key, now)
        _, requests, used = totals
        if rpm and requests >= rpm:
            snap = self._snapshot(key, totals, rpm, tpm, now)
            raise RateLimited(f"rate limit reached: {rpm} requests per minute for this key",
                              snap.reset_s, snap, "requests")
        if tpm and used + tokens > tpm:
            snap = self._snapshot(key, totals, rpm, tpm, now)
            if tokens > tpm:
                raise RateLimited(
                    f"request too large: it may use {tokens} tokens (prompt + max_tokens), over this key's "
                    f"limit of {tpm} tokens per minute; lower max_tokens",
                    self.window, snap, "tokens",
                )
            raise RateLimited(
                f"rate limit reached: {tpm} tokens per minute for this key ({used} in use, {tokens} requested)",
                self._wait_for_tokens(conn, key, totals, tokens, tpm, now), snap, "tokens",
            )
        bucket = self._bucket(now)
        self._run(conn, "add", {"k": key, "b": bucket, "r": 1, "t": tokens})
        if now - self._pruned_at > self.window:  # rows that left the window, every key's, once a window
            self._pruned_at = now
            self._run(conn, "prune", {"first": self._first_live(now) - 1})
        oldest = totals[0] if totals[0] is not None else bucket
        return Charge(key, bucket, tokens), self._snapshot(key, (oldest, requests + 1, used + tokens), rpm, tpm, now)

    def settle_in(self, conn: Connection, charge: Charge, tokens: int) -> None:
        """Replaces the reservation with the tokens really used (once). One row update: no lock
        needed, and giving tokens back never over-grants."""
        if not charge.settled and tokens != charge.tokens:
            self._run(conn, "add", {"k": charge.key, "b": charge.bucket, "r": 0, "t": tokens - charge.tokens})
        charge.settled = True
        charge.tokens = tokens

    def snapshot_in(self, conn: Connection, key: object, rpm: int, tpm: int, now: float | None = None) -> Snapshot:
        now = self._now(now)
        key = str(key)
        return self._snapshot(key, self._totals(conn, key, now), rpm, tpm, now)

    # -- without the database -------------------------------------------------------------------
    def blocked(self, key: object, now: float | None = None) -> RateLimited | None:
        """The refusal for a key this process last found out of requests, while that lasts: no
        request can be admitted before then, whichever process asks."""
        hit = self._blocked.get(str(key))
        if hit is None:
            return None
        now = self._now(now)
        until, snap = hit
        if now >= until:
            self._blocked.pop(str(key), None)
            return None
        snap = Snapshot(snap.rpm, snap.tpm, 0, snap.tokens_remaining, until - now)
        return RateLimited(f"rate limit reached: {snap.rpm} requests per minute for this key", until - now, snap,
                           "requests")

    # -- the same, each in a transaction of its own ---------------------------------------------
    def admit(self, key: object, tokens: int, rpm: int, tpm: int, now: float | None = None) -> tuple[Charge, Snapshot]:
        with self.db.write() as conn:
            return self.admit_in(conn, key, tokens, rpm, tpm, now)

    def settle(self, charge: Charge, tokens: int) -> None:
        with self.db.write() as conn:
            self.settle_in(conn, charge, tokens)

    def snapshot(self, key: object, rpm: int, tpm: int, now: float | None = None) -> Snapshot:
        with self.db.read() as conn:
            return self.snapshot_in(conn, key, rpm, tpm, now)
