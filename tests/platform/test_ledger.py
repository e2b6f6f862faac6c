import multiprocessing

import pytest

from herd.platform.config import MAVERICK, PlatformConfig, Price
from herd.platform.db import Database
from herd.platform.keys import KeyStore
from herd.platform.ledger import Ledger, UsageRecord, utc_day

DAY1 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
DAY2 = DAY1 + 86400


def rec(rid, key_id=None, model=MAVERICK, at=DAY1, **kw):
    return UsageRecord(request_id=rid, model=model, key_id=key_id, created_at=at, **kw)


def test_one_row_per_request_id(db):
    ledger = Ledger(db)
    assert ledger.begin(rec("r1", prompt_tokens=100, reserved_tokens=1124, retry_count=2))
    assert not ledger.begin(rec("r1", prompt_tokens=999))  # a repeated begin changes nothing
    running = ledger.get("r1")
    assert (running.status, running.prompt_tokens, running.reserved_tokens) == ("running", 100, 1124)
    assert ledger.end(rec("r1", status="finished", prompt_tokens=100, cached_tokens=16, completion_tokens=50,
                          images=1, latency_s=0.25, retry_count=2, http_status=200, response_id="chatcmpl-1"))
    # The end is idempotent too: the first completion wins.
    assert not ledger.end(rec("r1", status="failed", prompt_tokens=1, completion_tokens=1))
    r = ledger.get("r1")
    assert (r.status, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.images) == ("finished", 100, 16, 50, 1)
    assert (r.retry_count, r.http_status, r.response_id, r.latency_s) == (2, 200, "chatcmpl-1", 0.25)
    assert r.cost_usd == pytest.approx((100 * 0.27 + 50 * 0.85) / 1e6)
    assert len(ledger.records()) == 1


def test_end_without_begin_and_statuses(db):
    ledger = Ledger(db)
    assert ledger.end(rec("bad", status="failed", http_status=400, error="x" * 2000))
    assert ledger.get("bad").error == "x" * 500
    assert ledger.end(rec("gone", status="aborted", prompt_tokens=10, completion_tokens=3))
    with pytest.raises(ValueError):
        ledger.end(rec("weird", status="running"))
    assert [r.status for r in ledger.records()] == ["failed", "aborted"]


def test_cost_uses_the_models_prices(db):
    config = PlatformConfig(prices={"small": Price(0.1, 0.2, cached_input=0.05)})
    ledger = Ledger(db, config)
    ledger.end(rec("a", model="small", status="finished", prompt_tokens=1000, cached_tokens=200, completion_tokens=100))
    ledger.end(rec("b", model="other", status="finished", prompt_tokens=1000, completion_tokens=100))
    assert ledger.get("a").cost_usd == pytest.approx((800 * 0.1 + 200 * 0.05 + 100 * 0.2) / 1e6)
    assert ledger.get("b").cost_usd == pytest.approx((1000 * 0.27 + 100 * 0.85) / 1e6)  # the default price


def test_recover_marks_orphans_aborted(db):
    ledger = Ledger(db)
    ledger.begin(rec("old", prompt_tokens=1000, reserved_tokens=2024, at=DAY1))
    ledger.begin(rec("done", at=DAY1))
    ledger.end(rec("done", status="finished", prompt_tokens=5, completion_tokens=5))
    assert ledger.recover(before=DAY1 + 10) == 1
    old = ledger.get("old")
    assert old.status == "aborted" and "stopped" in old.error
    assert old.cost_usd == pytest.approx(1000 * 0.27 / 1e6)  # billed for the prompt it was given
    assert ledger.get("done").status == "finished"
    assert ledger.recover(before=DAY1 + 10) == 0
    # Another server on the same database recovered it while this one still served it: the
    # late end completes the row with what really happened, once; a second end changes nothing.
    assert ledger.end(rec("old", status="finished", prompt_tokens=1000, completion_tokens=7))
    assert (ledger.get("old").status, ledger.get("old").completion_tokens) == ("finished", 7)
    assert not ledger.end(rec("old", status="aborted", prompt_tokens=1000, completion_tokens=9))
    assert ledger.get("old").completion_tokens == 7


def test_summary_by_key_model_day(db):
    keys = KeyStore(db)
    a = keys.create("alice")[0].id
    b = keys.create("bob")[0].id
    ledger = Ledger(db, PlatformConfig(prices={"small": Price(0.1, 0.2)}))
    ledger.end(rec("1", a, at=DAY1, status="finished", prompt_tokens=100, completion_tokens=10, cached_tokens=5))
    ledger.end(rec("2", a, at=DAY1 + 60, status="aborted", prompt_tokens=50, completion_tokens=1, retry_count=1))
    ledger.end(rec("3", a, at=DAY2, status="finished", prompt_tokens=7, completion_tokens=3, images=2))
    ledger.end(rec("4", b, model="small", at=DAY1, status="failed"))
    ledger.end(rec("5", None, at=DAY1, status="finished", prompt_tokens=1, completion_tokens=1))
    ledger.begin(rec("6", a, at=DAY1, prompt_tokens=1000))  # still running: not summarised

    rows = ledger.summary()
    # Rows come ordered by key, model and day; a NULL key sorts first on SQLite, last on PostgreSQL.
    assert sorted((r["key_name"] or "~", r["model"], r["day"], r["requests"]) for r in rows) == [
        ("alice", MAVERICK, utc_day(DAY1), 2),
        ("alice", MAVERICK, utc_day(DAY2), 1),
        ("bob", "small", utc_day(DAY1), 1),
        ("~", MAVERICK, utc_day(DAY1), 1),
    ]
    assert [r["key_name"] for r in rows if r["key_name"]] == ["alice", "alice", "bob"]
    by_key = {(r["key_name"], r["day"]): r for r in rows}
    d1 = by_key[("alice", "2026-01-01")]
    assert (d1["finished"], d1["aborted"], d1["failed"], d1["retries"]) == (1, 1, 0, 1)
    assert (d1["prompt_tokens"], d1["cached_tokens"], d1["completion_tokens"], d1["total_tokens"]) == (150, 5, 11, 161)
    assert d1["cost_usd"] == pytest.approx((150 * 0.27 + 11 * 0.85) / 1e6)
    assert d1["price_per_1m"] == {"input": 0.27, "output": 0.85, "blended_3_1": 0.415}
    assert by_key[("alice", "2026-01-02")]["images"] == 2
    assert by_key[("bob", "2026-01-01")]["price_per_1m"]["blended_3_1"] == pytest.approx(0.125)

    only_a = ledger.summary(key_id=a, by=("model",))
    assert [(r["model"], r["requests"], r["prompt_tokens"]) for r in only_a] == [(MAVERICK, 3, 157)]
    assert ledger.summary(since="2026-01-02", by=("day",)) == [
        {"day": "2026-01-02", "requests": 1, "finished": 1, "aborted": 0, "failed": 0, "retries": 0,
         "prompt_tokens": 7, "cached_tokens": 0, "completion_tokens": 3, "images": 2,
         "cost_usd": pytest.approx((7 * 0.27 + 3 * 0.85) / 1e6), "total_tokens": 10,
         "batch_requests": 0, "batch_tokens": 0, "batch_cost_usd": 0.0}
    ]
    assert sum(r["requests"] for r in ledger.summary(until="2026-01-01", by=())) == 4
    with pytest.raises(ValueError):
        ledger.summary(by=("hour",))


def _write_many(url: str, prefix: str, n: int) -> None:
    ledger = Ledger(Database(url))
    for i in range(n):
        ledger.begin(rec(f"{prefix}{i}"))
        ledger.end(rec(f"{prefix}{i}", status="finished", prompt_tokens=1, completion_tokens=1))


def test_writers_in_several_processes(db):
    """A server writing while `herd usage` and another writer run: nothing fails with 'locked'."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(db.url, f"p{i}-", 25)) for i in range(3)]
    for p in procs:
        p.start()
    ledger = Ledger(db)
    while any(p.is_alive() for p in procs):
        ledger.summary()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(ledger.records()) == 75
    assert ledger.summary(by=())[0]["requests"] == 75
