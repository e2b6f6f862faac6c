"""`Platform`: keys, limiter and ledger over one database, with the decisions a server makes per
request (who is calling, may they, what did it cost). HTTP-free, so any front end can use it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from herd.platform.config import PlatformConfig, load_config
from herd.platform.db import Database, redact
from herd.platform.keys import ApiKey, KeyStore
from herd.platform.ledger import Ledger
from herd.platform.ratelimit import RateLimiter

log = logging.getLogger("herd.platform")


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
                 require_api_key: bool | None = None, clock=time.time):
        self.config = config or load_config()
        self.db = db or Database(self.config.resolved_database_url())
        self.require_api_key = self.config.require_api_key if require_api_key is None else require_api_key
        self.clock = clock
        self.keys = KeyStore(self.db)
        self.ledger = Ledger(self.db, self.config)
        self.limiter = RateLimiter(self.config.limits.window_seconds, clock)

    def start(self) -> None:
        """Call once before serving: closes rows a crash left running and rebuilds the rate
        windows from the ledger."""
        now = self.clock()
        # Restored first: a request a crash cut off still counts with its whole reservation.
        self.limiter.restore(self.ledger.recent_charges(now - self.limiter.window), now)
        recovered = self.ledger.recover(now)
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
    def authenticate(self, secret: str | None) -> Caller:
        """The caller of a request with this bearer secret, or AuthError (-> 401)."""
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
        self.db.close()
