"""`Platform`: keys, limiter and ledger over one database, with the decisions a server makes per
request (who is calling, may they, what did it cost). HTTP-free, so any front end can use it.

Key lookups are cached for KEY_CACHE_SECONDS: a busy server looks each key up about once per
that interval instead of once per request, and a key revoked from anywhere (`herd keys revoke`,
another server) stops working within that time; one revoked through this Platform stops at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from herd.platform.config import PlatformConfig, load_config
from herd.platform.db import Database, redact
from herd.platform.keys import ApiKey, KeyStore, hash_secret
from herd.platform.ledger import Ledger
from herd.platform.ratelimit import RateLimiter
from herd.platform.worker import DatabaseWorker

log = logging.getLogger("herd.platform")

KEY_CACHE_SECONDS = 2.0
_KEY_CACHE_SIZE = 10_000  # entries (valid and invalid secrets); cleared when full


@dataclass(frozen=True)
class Caller:
    key: ApiKey | None  # None: the server is open (no keys) and the request came without a valid one

    @property
    def key_id(self) -> int | None:
        return None if self.key is None else self.key.id


class AuthError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Platform:
    def __init__(self, config: PlatformConfig | None = None, db: Database | None = None, *,
                 require_api_key: bool | None = None, clock=time.time, key_cache_seconds: float = KEY_CACHE_SECONDS):
        self.config = config or load_config()
        self.db = db or Database(self.config.resolved_database_url())
        self.require_api_key = self.config.require_api_key if require_api_key is None else require_api_key
        self.clock = clock
        self.keys = KeyStore(self.db)
        self.ledger = Ledger(self.db, self.config)
        self.limiter = RateLimiter(self.db, self.config.limits.window_seconds, clock)
        self.worker = DatabaseWorker(self.db)  # the request path's database work, batched off the event loop
        self.key_cache_seconds = key_cache_seconds
        # False in all but one of several processes sharing the ledger (--api-server-count): a
        # "running" row there may be a sibling's request in flight, not a crash's leftover.
        self.recover_on_start = True
        self._callers: dict[str, tuple[float, int, Caller | AuthError]] = {}
        self._monotonic = time.monotonic  # the cache's clock (tests replace it)

    def start(self) -> None:
        """Call once before serving: closes rows a crash left running (the rate windows live in
        the database and need nothing). With several API server processes in one herd, call it
        once, before any of them serves: a later call would mark the others' requests in flight
        as aborted until they end (their `end` still completes the rows; see ledger.py)."""
        now = self.clock()
        recovered = self.ledger.recover(now) if self.recover_on_start else 0
        if recovered:
            log.warning("%d request(s) were in flight when the server last stopped; recorded as aborted", recovered)
        active = self.keys.count_active()
        where = redact(self.db.url)
        if active:
            log.info("API keys required (%d active key(s)); usage ledger in %s", active, where)
        elif self.require_api_key or self.keys.count(include_revoked=True):
            log.warning("API keys required but no active key exists: every request gets 401 until "
                        "`herd keys create --name NAME` makes one; usage ledger in %s", where)
        else:
            log.warning("no API keys exist: herd is OPEN, anyone who can reach it may call it "
                        "(`herd keys create --name NAME` closes it); usage ledger in %s", where)

    # -- per request --------------------------------------------------------------------------
    def cached_caller(self, secret: str | None) -> Caller | AuthError | None:
        """What `authenticate(secret)` answered less than key_cache_seconds ago (the caller, or
        the AuthError to raise), or None when it must be asked again. Never touches the database."""
        hit = self._callers.get(hash_secret(secret or ""))
        if hit is None or hit[1] != self.keys.changes or self._monotonic() >= hit[0]:
            return None
        return hit[2]

    def authenticate(self, secret: str | None) -> Caller:
        """The caller of a request with this bearer secret, or AuthError (-> 401). Looks the key
        up in the database, and caches the answer for `cached_caller`."""
        changes = self.keys.changes
        try:
            caller = self._authenticate(secret)
        except AuthError as e:
            self._remember(secret, changes, e)
            raise
        self._remember(secret, changes, caller)
        return caller

    def _remember(self, secret: str | None, changes: int, outcome: Caller | AuthError) -> None:
        if self.key_cache_seconds <= 0:
            return
        if len(self._callers) >= _KEY_CACHE_SIZE:
            self._callers.clear()
        self._callers[hash_secret(secret or "")] = (self._monotonic() + self.key_cache_seconds, changes, outcome)

    def _authenticate(self, secret: str | None) -> Caller:
        if secret:
            key = self.keys.authenticate(secret)
            if key is not None:
                return Caller(key)
        # Open (local development) only while no key was ever made: revoking the last key
        # must not open the server to everyone.
        if not self.require_api_key and self.keys.count(include_revoked=True) == 0:
            return Caller(None)
        if secret:
            raise AuthError("invalid API key: it is unknown or was revoked")
        raise AuthError("an API key is required: send `Authorization: Bearer <key>`")

    def limits_for(self, caller: Caller) -> tuple[int, int]:
        """(rpm, tpm) for the caller; (0, 0), i.e. unlimited, without a key."""
        if caller.key is None:
            return 0, 0
        d = self.config.limits
        k = caller.key
        return (d.rpm if k.rpm is None else k.rpm), (d.tpm if k.tpm is None else k.tpm)

    def reservation(self, prompt_tokens: int, max_tokens: int | None, n: int = 1) -> int:
        """Tokens to reserve at admission: the prompt plus max_tokens per sample (the configured
        default when the request has none; never the whole context)."""
        completion = self.config.limits.default_reserve_tokens if max_tokens is None else max(max_tokens, 0)
        return max(prompt_tokens, 0) + max(n, 1) * completion

    def close(self) -> None:
        self.worker.close()
        self.db.close()
