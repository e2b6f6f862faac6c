"""The platform layer: API keys, per-key rate limits, and the usage and cost ledger, in SQLite
(default, $HERD_HOME/herd.db) or PostgreSQL.

    config.py    herd.toml: database, auth, limits, prices (Maverick's by default)
    db.py        the SQLAlchemy engine and Alembic migrations (migrations/)
    keys.py      API keys: create (secret shown once, SHA-256 stored), list, revoke
    ratelimit.py per-key RPM/TPM in the database (one budget across processes and servers):
                 admit with a token reservation, settle at the end, Together's headers
    ledger.py    one usage row per request, with cost; summaries by key, model and day
    worker.py    the request path's database work, batched into one transaction per wake-up,
                 off the event loop
    service.py   Platform: the per-request decisions over all of the above (key lookups cached)
    meter.py     the two hooks the HTTP routes call (no database imports)
    middleware.py  FastAPI/ASGI integration: install(app, platform, model=...)
    commands.py  `herd keys ...` and `herd usage`

This file imports nothing, so `herd.platform.meter` and `herd.platform.commands` stay cheap to
import (the CLI registers its commands without loading SQLAlchemy).
"""
