import multiprocessing

from sqlalchemy import inspect, text

from herd.platform.db import Database, normalize_url


def test_urls():
    assert normalize_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert normalize_url("/tmp/x.db") == "sqlite:////tmp/x.db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_migrated_to_head_and_idempotent(db):
    assert db.current_revision() == db.head_revision() is not None
    tables = set(inspect(db.engine).get_table_names())
    assert {"api_keys", "usage", "alembic_version"} <= tables
    db.migrate()  # nothing left to do
    Database(db.url).migrate()  # a second process-like opener also finds nothing to do
    assert db.current_revision() == db.head_revision()


def test_sqlite_is_wal_with_busy_timeout(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'h.db'}")
    with db.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_sqlite_default_location_is_herd_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    db = Database()
    assert db.url == f"sqlite:///{tmp_path / 'home' / 'herd.db'}"
    assert (tmp_path / "home" / "herd.db").exists()


def _open_and_create(url: str, name: str) -> None:
    from herd.platform.keys import KeyStore

    KeyStore(Database(url)).create(name)


def test_concurrent_first_opens_migrate_once(tmp_path):
    """Processes opening a new database at the same moment (a server and a CLI command): all
    succeed, and the schema is migrated once."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    ctx = multiprocessing.get_context("fork")  # herd is already imported here; a fresh interpreter takes seconds
    procs = [ctx.Process(target=_open_and_create, args=(url, f"k{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    db = Database(url)
    with db.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar() == 4
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
