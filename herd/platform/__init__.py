"""The platform layer: API keys, per-key rate limits, and the usage and cost ledger, in SQLite
(default, $HERD_HOME/herd.db) or PostgreSQL.

    config.py    herd.toml: database, auth, limits, prices (Maverick's by default)
    db.py        the SQLAlchemy engine and Alembic migrations (migrations/)
    keys.py      API keys: create (secret shown once, SHA-256 stored), list, revoke
    ratelimit.py per-key RPM/TPM: reserve at admission, settle at the end, Together's headers
    ledger.py    one usage row per request, with cost; summaries by key, model and day
    service.py   Platform: the per-request decisions over all of the above
    meter.py     the two hooks the HTTP routes call (no database imports)
    middleware.py  FastAPI/ASGI integration: install(app, platform, model=...)
    commands.py  `herd keys ...` and `herd usage`

This file imports nothing, so `herd.platform.meter` and `herd.platform.commands` stay cheap to
import (the CLI registers its commands without loading SQLAlchemy).
"""
