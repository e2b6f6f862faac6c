"""The per-request decisions (auth and its cache, limits, reservation), and limits surviving a restart."""

import pytest

from herd.platform.config import Limits, PlatformConfig
from herd.platform.db import Database
from herd.platform.keys import KeyStore
from herd.platform.ledger import UsageRecord
from herd.platform.ratelimit import RateLimited
from herd.platform.service import AuthError, Platform


class Clock:
    def __init__(self, t=2_000_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_open_until_a_key_exists(db):
    p = Platform(PlatformConfig(), db)
    p.start()
    assert p.authenticate(None).key is None
    assert p.authenticate("anything").key is None  # SDKs insist on sending some key
    key, secret = p.keys.create("alice")
    with pytest.raises(AuthError, match="required"):
        p.authenticate(None)
    with pytest.raises(AuthError, match="invalid"):
        p.authenticate("herd-wrong")
    assert p.authenticate(secret).key_id == key.id
    p.keys.revoke("alice")
    # Revoking the last key does not open the server again.
    with pytest.raises(AuthError, match="invalid"):
        p.authenticate(secret)
    with pytest.raises(AuthError):
        p.authenticate(None)


def test_require_api_key_without_keys(db):
    p = Platform(PlatformConfig(), db, require_api_key=True)
    with pytest.raises(AuthError):
        p.authenticate(None)


def test_limits_and_reservation(db):
    p = Platform(PlatformConfig(limits=Limits(rpm=5, tpm=500, default_reserve_tokens=64)), db)
    a, sa = p.keys.create("a")
    b, sb = p.keys.create("b", rpm=0, tpm=7)
    assert p.limits_for(p.authenticate(sa)) == (5, 500)
    assert p.limits_for(p.authenticate(sb)) == (0, 7)
    assert p.reservation(100, 20) == 120
    assert p.reservation(100, None) == 164  # the configured default, not the context
    assert p.reservation(100, 20, n=3) == 160


def test_limits_survive_a_restart(db):
    """A key at its limit is still at its limit after the server restarts, including for the
    requests a crash cut off (their reservation counts)."""
    clock = Clock()
    config = PlatformConfig(limits=Limits(rpm=3, tpm=1000))
    p = Platform(config, db, clock=clock)
    p.start()
    key, secret = p.keys.create("k")
    caller = p.authenticate(secret)
    rpm, tpm = p.limits_for(caller)
    # Two requests end normally, one is in flight when the server dies.
    for i, (used, done) in enumerate([(100, True), (200, True), (None, False)]):
        charge, _ = p.limiter.admit(key.id, 300, rpm, tpm)
        p.ledger.begin(UsageRecord(f"r{i}", "m", key.id, created_at=clock.t, prompt_tokens=50, reserved_tokens=300))
        if done:
            p.limiter.settle(charge, used)
            p.ledger.end(UsageRecord(f"r{i}", "m", key.id, status="finished", created_at=clock.t,
                                     prompt_tokens=50, completion_tokens=used - 50))
        clock.t += 1
    before = p.limiter.snapshot(key.id, rpm, tpm)
    assert (before.requests_remaining, before.tokens_remaining) == (0, 400)

    clock.t += 5
    restarted = Platform(config, db, clock=clock)
    restarted.start()
    assert restarted.ledger.get("r2").status == "aborted"
    after = restarted.limiter.snapshot(key.id, rpm, tpm)
    assert (after.requests_remaining, after.tokens_remaining) == (0, 400)
    with pytest.raises(RateLimited):
        restarted.limiter.admit(key.id, 1, rpm, tpm)
    clock.t += 60
    assert restarted.limiter.snapshot(key.id, rpm, tpm).requests_remaining == 3


def test_key_lookups_are_cached_briefly(db):
    """A server answers a key from memory for key_cache_seconds; a revocation from elsewhere
    (`herd keys revoke`, another server) takes effect within that time, one through this
    Platform at once."""
    p = Platform(PlatformConfig(), db, key_cache_seconds=2)
    now = [100.0]
    p._monotonic = lambda: now[0]
    key, secret = p.keys.create("alice")
    assert p.cached_caller(secret) is None  # never asked yet
    assert p.authenticate(secret).key_id == key.id
    assert p.cached_caller(secret).key_id == key.id
    assert isinstance(p.cached_caller("herd-wrong"), type(None))
    with pytest.raises(AuthError):
        p.authenticate("herd-wrong")
    assert isinstance(p.cached_caller("herd-wrong"), AuthError)  # refusals are remembered too

    KeyStore(Database(db.url)).revoke("alice")  # from another process
    now[0] += 1.9
    assert p.cached_caller(secret).key_id == key.id  # still cached...
    now[0] += 0.2
    assert p.cached_caller(secret) is None  # ...for key_cache_seconds at most
    with pytest.raises(AuthError):
        p.authenticate(secret)

    bob, bob_secret = p.keys.create("bob")
    assert p.authenticate(bob_secret).key_id == bob.id
    p.keys.revoke("bob")  # through this Platform: forgotten at once
    assert p.cached_caller(bob_secret) is None
