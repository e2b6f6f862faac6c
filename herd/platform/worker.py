"""The platform's database work, off the event loop: one thread runs the operations requests hand
it (rate-limit decisions, ledger rows), as many as are waiting in ONE write transaction, so a
busy server pays one commit and one thread hand-off per batch instead of several per request.

An operation is a function of an open connection. `submit` returns an asyncio future that
resolves once the transaction holding the operation has COMMITTED (so a ledger row awaited this
way is durable before the caller goes on); `post` is the same without anyone waiting. An
operation may raise an ordinary exception (RateLimited) as its answer: the statements it ran still
commit with the batch. When the transaction itself fails (a database error), each operation of
the batch is run again alone, so one bad operation fails only its own caller: operations must
therefore be safe to run twice against a rolled-back database (they are: see the callers).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from herd.platform.db import Database

log = logging.getLogger("herd.platform")

MAX_BATCH = 256  # operations per transaction

Op = Callable[[Connection], Any]


class _Item:
    __slots__ = ("fn", "loop", "future", "ok", "value", "lock")

    def __init__(self, fn: Op, loop: asyncio.AbstractEventLoop | None, future: asyncio.Future | None,
                 lock: int | None = None):
        self.fn = fn
        self.lock = lock
        self.loop = loop
        self.future = future
        self.ok = False
        self.value: Any = None

    def run(self, conn: Connection, database_errors: tuple[type[BaseException], ...]) -> None:
        try:
            self.value, self.ok = self.fn(conn), True
        except database_errors:
            raise  # the transaction is broken (PostgreSQL refuses all that follows): retried one by one
        except Exception as e:  # the operation's answer (e.g. RateLimited)
            self.value, self.ok = e, False


def _lock_order(item: _Item) -> int:
    return -(2**32) if item.lock is None else item.lock


def _deliver(items: list[_Item]) -> None:
    """On the event loop: hands a batch's answers to their waiters (one wake-up per batch)."""
    for item in items:
        if not item.future.done():
            if item.ok:
                item.future.set_result(item.value)
            else:
                item.future.set_exception(item.value)


class DatabaseWorker:
    def __init__(self, db: Database):
        self.db = db
        self._items: deque[_Item] = deque()
        self._wake = threading.Condition()
        self._pid = None  # the process whose thread runs (a forked child starts its own)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None  # the thread's own
        # Operations run driver statements (Database.cursor): the driver's own errors break the
        # transaction as SQLAlchemy's do.
        dialect = db.engine.dialect
        dbapi = getattr(dialect, "loaded_dbapi", None) or dialect.dbapi
        self._database_errors = (SQLAlchemyError, dbapi.Error)

    # -- the event loop's side ------------------------------------------------------------------
    def submit(self, fn: Op, *, lock: int | None = None) -> asyncio.Future:
        """Runs `fn(conn)` in the next transaction; the future holds its result once committed.
        `lock`: the advisory lock `fn` takes (herd.platform.ratelimit.lock_id): a batch runs its
        operations in lock order, so that two processes' batches never wait on each other in a
        cycle (PostgreSQL would break such a deadlock only after a second)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(_Item(fn, loop, future, lock))
        return future

    def post(self, fn: Op) -> None:
        """Runs `fn(conn)` in the next transaction; failures are logged."""
        self._put(_Item(fn, None, None))

    def _put(self, item: _Item) -> None:
        if self._pid != os.getpid():
            self._start()
        with self._wake:
            self._items.append(item)
            self._wake.notify()

    def _start(self) -> None:
        with self._wake:
            if self._pid == os.getpid():
                return
            self._items.clear()  # a fork's copy of the parent's queue is the parent's business
            self._pid = os.getpid()
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="herd-platform-db", daemon=True)
            self._thread.start()
        atexit.register(self.close)

    def close(self, timeout: float = 10.0) -> None:
        """Runs what is queued, then stops the thread."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        with self._wake:
            self._closing = True
            self._wake.notify()
        thread.join(timeout)

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._items and not self._closing:
                    self._wake.wait()
                if not self._items:
                    self._drop_connection()
                    return
                batch = [self._items.popleft() for _ in range(min(len(self._items), MAX_BATCH))]
            # Operations of different requests are independent, and one request has one operation
            # in a batch at most, or unlocked ones (kept in order: the sort is stable).
            batch.sort(key=_lock_order)
            self._run_batch(batch)

    def _connection(self) -> Connection:
        # One connection for the thread's life: no pool checkout and reset per batch.
        if self._conn is None or self._conn.invalidated or self._conn.closed:
            self._conn = self.db.engine.connect().execution_options(herd_write=True)
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:
                pass

    def _run_batch(self, batch: list[_Item]) -> None:
        try:
            conn = self._connection()
            with self.db.driver_transaction(conn):
                for item in batch:
                    item.run(conn, self._database_errors)
        except Exception as e:
            self._drop_connection()
            if len(batch) > 1:
                for item in batch:
                    self._run_batch([item])
                return
            log.exception("platform database operation failed")
            batch[0].ok, batch[0].value = False, e
        self._deliver(batch)

    @staticmethod
    def _deliver(batch: list[_Item]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        for item in batch:
            if item.future is None:
                if not item.ok:
                    log.error("platform database operation failed: %r", item.value)
            else:
                by_loop.setdefault(item.loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
