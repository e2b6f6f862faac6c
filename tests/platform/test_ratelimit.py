import pytest

from herd.platform.ratelimit import RateLimited, RateLimiter


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_requests_per_minute_and_headers():
    clock = Clock()
    rl = RateLimiter(60, clock)
    for i in range(3):
        charge, snap = rl.take("k", rpm=3, tpm=0)
        assert snap.requests_remaining == 2 - i
        clock.t += 10
    h = snap.headers()
    assert h == {"x-ratelimit-limit": "3", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "40"}
    with pytest.raises(RateLimited) as e:
        rl.take("k", rpm=3, tpm=0)
    # The first request (t=1000) leaves the window at 1060; it is now 1030.
    assert e.value.retry_after == pytest.approx(30)
    assert e.value.headers()["retry-after"] == "30"
    assert e.value.headers()["retry-after-ms"] == "30000"
    assert e.value.kind == "requests"
    rl.take("other", rpm=3, tpm=0)  # keys are independent
    clock.t = 1060.0
    _, snap = rl.take("k", rpm=3, tpm=0)
    assert snap.requests_remaining == 0


def test_tokens_reserved_then_settled():
    clock = Clock()
    rl = RateLimiter(60, clock)
    a, _ = rl.take("k", rpm=0, tpm=1000)
    snap = rl.reserve(a, 600, rpm=0, tpm=1000)  # prompt + max_tokens
    assert snap.tokens_remaining == 400
    assert snap.headers() == {"x-tokenlimit-limit": "1000", "x-tokenlimit-remaining": "400"}
    b, _ = rl.take("k", rpm=0, tpm=1000)
    clock.t += 5
    with pytest.raises(RateLimited) as e:
        rl.reserve(b, 500, rpm=0, tpm=1000)
    assert e.value.kind == "tokens"
    assert e.value.retry_after == pytest.approx(55)  # when `a` leaves the window
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 400  # the refused request holds nothing
    rl.settle(a, 150)  # it used far less than it reserved
    rl.settle(a, 999)  # settling twice changes nothing
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 850
    b, _ = rl.take("k", rpm=0, tpm=1000)
    rl.reserve(b, 500, rpm=0, tpm=1000)
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 350
    clock.t = 1061  # `a` (t=1000) has left the window, `b` (t=1005) has not
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 500
    clock.t = 1066
    assert rl.snapshot("k", 0, 1000).tokens_remaining == 1000


def test_refused_requests_do_not_count():
    rl = RateLimiter(60, Clock())
    a, _ = rl.take("k", rpm=2, tpm=100)
    with pytest.raises(RateLimited, match="too large"):
        rl.reserve(a, 101, rpm=2, tpm=100)
    b, _ = rl.take("k", rpm=2, tpm=100)
    c, snap = rl.take("k", rpm=2, tpm=100)
    assert snap.requests_remaining == 0
    rl.release(c)
    assert rl.snapshot("k", 2, 100).requests_remaining == 1


def test_spent_token_budget_refuses_before_the_body():
    clock = Clock()
    rl = RateLimiter(60, clock)
    a, _ = rl.take("k", rpm=0, tpm=100)
    rl.reserve(a, 100, rpm=0, tpm=100)
    clock.t += 1
    with pytest.raises(RateLimited) as e:
        rl.take("k", rpm=0, tpm=100)
    assert e.value.retry_after == pytest.approx(59)


def test_retry_after_waits_for_enough_tokens():
    clock = Clock()
    rl = RateLimiter(60, clock)
    for tokens in (300, 300, 300):
        c, _ = rl.take("k", 0, 1000)
        rl.reserve(c, tokens, 0, 1000)
        clock.t += 10
    c, _ = rl.take("k", 0, 1000)
    with pytest.raises(RateLimited) as e:
        rl.reserve(c, 650, 0, 1000)  # 100 free: two of the 300s must leave (t=1000 and t=1010)
    assert e.value.retry_after == pytest.approx(1010 + 60 - 1030)


def test_unlimited_and_restore():
    clock = Clock()
    rl = RateLimiter(60, clock)
    for _ in range(1000):
        c, snap = rl.take("k", 0, 0)
        rl.reserve(c, 10**6, 0, 0)
    assert snap.headers() == {}
    fresh = RateLimiter(60, clock)
    assert fresh.restore([("k", 990.0, 500), ("k", 930.0, 500), ("j", 999.0, 10)]) == 2  # t=930 has left the window
    snap = fresh.snapshot("k", 5, 1000)
    assert (snap.requests_remaining, snap.tokens_remaining) == (4, 500)
    assert snap.reset_s == pytest.approx(50)
