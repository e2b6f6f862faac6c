"""Storage fixtures: every storage test runs on SQLite, and also on PostgreSQL when
HERD_TEST_POSTGRES_URL is set (.ci/postgres.sh starts one and prints that URL). Each PostgreSQL
test gets a schema of its own, dropped afterwards."""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

import pytest

from herd.platform.db import Database, normalize_url

POSTGRES_URL = os.environ.get("HERD_TEST_POSTGRES_URL")


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A URL of an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'herd.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("HERD_TEST_POSTGRES_URL is not set (.ci/postgres.sh starts a PostgreSQL server)")
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(normalize_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _with_search_path(POSTGRES_URL, schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def db(db_url):
    database = Database(db_url)
    yield database
    database.close()
