"""The platform's tables (SQLAlchemy Core). Changing them needs a migration in migrations/versions."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, text

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("prefix", String(32), nullable=False),  # the secret's first characters, to recognise it
    Column("secret_hash", String(64), nullable=False, unique=True),  # sha256 hex of the secret
    Column("rpm", Integer, nullable=True),  # None: the configured default; 0: unlimited
    Column("tpm", Integer, nullable=True),
    Column("created_at", Float, nullable=False),  # unix seconds
    Column("revoked_at", Float, nullable=True),
)
# One active key per name (a revoked key's name may be used again).
Index(
    "ix_api_keys_active_name",
    api_keys.c.name,
    unique=True,
    sqlite_where=text("revoked_at IS NULL"),
    postgresql_where=text("revoked_at IS NULL"),
)

usage = Table(
    "usage",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=True),  # None: served without keys
    Column("model", String(200), nullable=False),
    Column("path", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # running | finished | aborted | failed
    Column("created_at", Float, nullable=False),  # admission, unix seconds
    Column("day", String(10), nullable=False),  # UTC YYYY-MM-DD of created_at
    Column("latency_s", Float, nullable=True),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("cached_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("reserved_tokens", Integer, nullable=False, default=0),
    Column("images", Integer, nullable=False, default=0),
    Column("cost_usd", Float, nullable=False, default=0.0),
    Column("retry_count", Integer, nullable=False, default=0),
    Column("http_status", Integer, nullable=True),
    Column("response_id", String(200), nullable=True),  # the response body's `id` (chatcmpl-...)
    Column("error", String(500), nullable=True),
    # A batch-API line: its own rate-limit pool and the batch discount (migration 0002).
    Column("batch", Boolean, nullable=False, default=False, server_default=text("false")),
)
Index("ix_usage_key_created", usage.c.key_id, usage.c.created_at)
Index("ix_usage_created", usage.c.created_at)
Index("ix_usage_status", usage.c.status)

# Per-key rate-limit counters (herd.platform.ratelimit): one row per key per bucket of the window
# (1 s of a 60 s window), shared by every process that serves from this database.
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("limit_key", String(100), primary_key=True),  # str(key id), or a pool's own name
    Column("bucket", BigInteger, primary_key=True),  # floor(admission time / bucket seconds)
    Column("requests", Integer, nullable=False),
    Column("tokens", BigInteger, nullable=False),
)
