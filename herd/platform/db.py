"""The database: one SQLAlchemy engine for SQLite (default: $HERD_HOME/herd.db) or PostgreSQL
(a `postgresql://` URL, driven by psycopg 3), and Alembic migrations applied on open.

SQLite runs in WAL mode with a busy timeout, so `herd keys` / `herd usage` can run beside a
serving herd: readers never block the writer, and writers queue for the write lock instead of
failing. Write transactions take the lock up front (BEGIN IMMEDIATE): a transaction that read
first and wrote later could otherwise fail at once with "database is locked" when another
process wrote in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from herd.platform.config import herd_home

log = logging.getLogger("herd.platform")

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_MIGRATION_LOCK = 0x6865726401  # pg_advisory_xact_lock key ("herd" + 1)
_NAMED_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def default_url() -> str:
    return f"sqlite:///{herd_home() / 'herd.db'}"


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` use psycopg 3; a bare path means a SQLite file."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser()}"
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return url


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


class Database:
    """An engine plus the platform's schema. `read()` and `write()` hand out connections inside a
    transaction that commits on success."""

    def __init__(self, url: str | None = None, *, migrate: bool = True, sqlite_synchronous: str = "NORMAL"):
        self.url = normalize_url(url or default_url())
        u = make_url(self.url)
        self.dialect = u.get_backend_name()
        if self.dialect == "sqlite":
            database = u.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            _setup_sqlite(self.engine, sqlite_synchronous)
        elif self.dialect == "postgresql":
            self.engine = create_engine(self.url, pool_pre_ping=True, pool_size=8, max_overflow=16)
        else:
            raise ValueError(f"unsupported database {redact(self.url)}: use sqlite:/// or postgresql://")
        self._writer = self.engine.execution_options(herd_write=True)
        _open.add(self)
        if migrate:
            self.migrate()

    def __repr__(self) -> str:
        return f"Database({redact(self.url)!r})"

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # -- the request path's few fixed statements ------------------------------------------------
    def driver_sql(self, sql: str) -> str:
        """`sql` with its `:name` parameters in the driver's style (sqlite3 takes `:name`,
        psycopg `%(name)s`), for `cursor`."""
        return sql if self.dialect == "sqlite" else _NAMED_PARAM.sub(r"%(\1)s", sql)

    @contextlib.contextmanager
    def driver_transaction(self, conn: Connection) -> Iterator[None]:
        """A write transaction run on `conn`'s driver connection, for statements that use only
        `cursor` (the platform's database worker: SQLAlchemy's begin and commit cost it more
        than the statements of a whole batch)."""
        raw = conn.connection.dbapi_connection
        if self.dialect == "sqlite":
            raw.execute("BEGIN IMMEDIATE")  # the connection is in autocommit mode (see _setup_sqlite)
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                raw.rollback()
            raise
        raw.commit()

    @staticmethod
    def cursor(conn: Connection):
        """A driver cursor inside `conn`'s transaction. The per-request statements (rate-limit
        decisions, ledger rows) run on it: SQLAlchemy's work per statement costs several times
        SQLite's own, and these statements are fixed text that needs none of it."""
        return conn.connection.dbapi_connection.cursor()

    # -- migrations -------------------------------------------------------------------------
    def _alembic(self, conn: Connection):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        return cfg

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory(str(MIGRATIONS)).get_current_head()

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def migrate(self, revision: str = "head") -> None:
        """Brings the schema to `revision`. Concurrent callers (a server and a CLI starting
        together) serialise on the write lock (SQLite) or an advisory lock (PostgreSQL), and the
        second finds nothing left to do."""
        from alembic import command

        if revision == "head" and self.current_revision() == self.head_revision():
            return
        with self.write() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            command.upgrade(self._alembic(conn), revision)
        log.info("database %s at schema %s", redact(self.url), self.current_revision())


# A forked child (e.g. one of several API server processes) must not use its parent's pooled
# connections: it opens its own, and leaves the parent's alone.
_open: weakref.WeakSet[Database] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for db in list(_open):
        db.engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _setup_sqlite(engine: Engine, synchronous: str) -> None:
    synchronous = synchronous.upper()
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"sqlite synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        # herd issues BEGIN itself (below); pysqlite's own transaction handling would defer it.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a commit survives the process being killed (kill -9); FULL also
        # survives power loss, at an fsync per commit.
        cur.execute(f"PRAGMA synchronous = {synchronous}")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("herd_write") else "BEGIN")


_shared: dict[str, Database] = {}
_shared_lock = threading.Lock()


def open_database(url: str | None = None) -> Database:
    """One Database per URL per process (engines hold pools; open them once)."""
    key = normalize_url(url or default_url())
    with _shared_lock:
        db = _shared.get(key)
        if db is None:
            db = _shared[key] = Database(key)
        return db
