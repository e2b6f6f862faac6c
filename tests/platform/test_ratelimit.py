"""The rate limiter over the database (SQLite, and PostgreSQL when configured): requests and
tokens per minute, 1-second buckets (a charge counts until its bucket's end leaves the window),
Together's headers, and several limiters (as several processes) sharing one budget."""

import pytest

from herd.platform.ratelimit import RateLimited, RateLimiter
from herd.platform.schema import rate_windows


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_requests_per_minute_and_headers(db):
    clock = Clock()
    rl = RateLimiter(db, 60, clock)
    for i in range(3):
        charge, snap = rl.admit("k", 0, rpm=3, tpm=0)
        assert snap.requests_remaining == 2 - i
        clock.t += 10
    h = snap.headers()
    # The first request (t=1000, bucket [1000, 1001)) leaves the window at 1061; it is now 1020.
    assert h == {"x-ratelimit-limit": "3", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "41"}
    clock.t = 1030.0
    with pytest.raises(RateLimited) as e:
        rl.admit("k", 0, rpm=3, tpm=0)
    assert e.value.retry_after == pytest.approx(31)
    assert e.value.headers()["retry-after"] == "31"
    assert e.value.headers()["retry-after-ms"] == "31000"
    assert e.value.kind == "requests"
    rl.admit("other", 0, rpm=3, tpm=0)  # keys are independent
    clock.t = 1060.5
    with pytest.raises(RateLimited):  # never early: the bucket of t=1000 is still in the window
        rl.admit("k", 0, rpm=3, tpm=0)
    # Known to be out of requests: refused without the database until the oldest one leaves.
    assert rl.blocked("k").retry_after == pytest.approx(0.5)
    assert rl.blocked("k").headers()["x-ratelimit-remaining"] == "0"
    assert rl.blocked("other") is None
    clock.t = 1061.0
    assert rl.blocked("k") is None
    _, snap = rl.admit("k", 0, rpm=3, tpm=0)
    assert snap.requests_remaining == 0


def test_tokens_reserved_then_settled(db):
    clock = Clock()
    rl = RateLimiter(db, 60, clock)
    a, snap = rl.admit("k", 600, rpm=0, tpm=1000)  # prompt + max_tokens
    assert snap.tokens_remaining == 400
    assert snap.headers() == {"x-tokenlimit-limit": "1000", "x-tokenlimit-remaining": "400"}
    assert snap.settled(600, 150).tokens_remaining == 850
    clock.t += 5
    with pytest.raises(RateLimited) as e:
        rl.admit("k", 500, rpm=0, tpm=1000)
    assert e.value.kind == "tokens"
    assert e.value.retry_after == pytest.approx(56)  # when `a`'s bucket leaves the window
    assert rl.blocked("k") is None  # tokens come back when requests end: no refusal from memory
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 400  # the refused request holds nothing
    assert rl.snapshot("k", 2, 0).requests_remaining == 1  # nor a request slot
    rl.settle(a, 150)  # it used far less than it reserved
    rl.settle(a, 999)  # settling twice changes nothing
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 850
    b, _ = rl.admit("k", 500, rpm=0, tpm=1000)
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 350
    clock.t = 1062  # `a` (t=1000) has left the window, `b` (t=1005) has not
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 500
    clock.t = 1067
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 1000


def test_too_large_for_the_key(db):
    rl = RateLimiter(db, 60, Clock())
    with pytest.raises(RateLimited, match="too large"):
        rl.admit("k", 101, rpm=2, tpm=100)
    rl.admit("k", 100, rpm=2, tpm=100)
    assert rl.snapshot("k", 2, 100).requests_remaining == 1


def test_retry_after_waits_for_enough_tokens(db):
    clock = Clock()
    rl = RateLimiter(db, 60, clock)
    for tokens in (300, 300, 300):
        rl.admit("k", tokens, 0, 1000)
        clock.t += 10
    with pytest.raises(RateLimited) as e:
        rl.admit("k", 650, 0, 1000)  # 100 free: two of the 300s must leave (t=1000 and t=1010)
    assert e.value.retry_after == pytest.approx(1011 + 60 - 1030)


def test_limiters_share_one_budget_and_old_buckets_go(db):
    """Two limiters on one database (as two processes): one budget. Rows that left the window
    are deleted once a window."""
    clock = Clock()
    first, second = RateLimiter(db, 60, clock), RateLimiter(type(db)(db.url), 60, clock)
    granted = 0
    for i in range(12):
        try:
            (first if i % 2 else second).admit(7, 1, rpm=10, tpm=0)
            granted += 1
        except RateLimited:
            pass
        clock.t += 0.5
    assert granted == 10
    clock.t += 200
    first.admit(7, 5, rpm=10, tpm=0)
    with db.read() as conn:
        assert conn.execute(rate_windows.select()).all() == [("7", 1206, 1, 5)]


def test_unlimited_keys_and_sub_minute_windows(db):
    clock = Clock()
    rl = RateLimiter(db, 6, clock)  # 0.1 s buckets
    for _ in range(3):
        _, snap = rl.admit("k", 10**6, 0, 0)
    assert snap.headers() == {}
    rl.admit("j", 0, 1, 0)
    clock.t = 1006.05  # t=1000's bucket [1000, 1000.1) leaves at 1006.1
    with pytest.raises(RateLimited):
        rl.admit("j", 0, 1, 0)
    clock.t = 1006.15
    rl.admit("j", 0, 1, 0)
