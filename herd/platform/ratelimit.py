"""Per-key requests-per-minute and tokens-per-minute over a sliding window.

A request takes a request slot when it arrives (`take`), reserves prompt + max_tokens tokens once
its prompt is tokenized (`reserve`; a request without max_tokens reserves the configured default,
not the whole context), and is settled to the tokens it really used when it ends (`settle`). Each
charge stays at its admission time and leaves the window `window` seconds later.

The limiter lives in the one serving process, in memory (one lock, O(1) amortised per call). It is
correct across restarts because every admitted request is in the ledger from admission on, with
its reservation, then its real usage: `restore` rebuilds the window from the ledger's last minute.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class Charge:
    key: object
    at: float
    tokens: int = 0
    settled: bool = False
    released: bool = False


@dataclass
class _Window:
    charges: deque = field(default_factory=deque)
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Snapshot:
    """What the response headers report after a decision."""

    rpm: int  # 0: unlimited
    tpm: int
    requests_remaining: int
    tokens_remaining: int
    reset_s: float  # until the oldest charge leaves the window (0 when the window is empty)

    def headers(self) -> dict[str, str]:
        """Together's header set (limits of 0 mean unlimited and are left out)."""
        h: dict[str, str] = {}
        if self.rpm:
            h["x-ratelimit-limit"] = str(self.rpm)
            h["x-ratelimit-remaining"] = str(max(self.requests_remaining, 0))
            h["x-ratelimit-reset"] = str(math.ceil(self.reset_s))
        if self.tpm:
            h["x-tokenlimit-limit"] = str(self.tpm)
            h["x-tokenlimit-remaining"] = str(max(self.tokens_remaining, 0))
        return h


class RateLimited(Exception):
    """Over a limit: answer 429 with `retry_after` seconds and the snapshot's headers."""

    def __init__(self, message: str, retry_after: float, snapshot: Snapshot, kind: str):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.snapshot = snapshot
        self.kind = kind  # "requests" | "tokens"

    def headers(self) -> dict[str, str]:
        h = self.snapshot.headers()
        h["retry-after"] = str(max(1, math.ceil(self.retry_after)))
        h["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        return h


class RateLimiter:
    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.time):
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._keys: dict[object, _Window] = {}

    # -- internals (under the lock) ------------------------------------------------------------
    def _expire(self, w: _Window, now: float) -> None:
        horizon = now - self.window
        q = w.charges
        while q and q[0].at <= horizon:
            c = q.popleft()
            if not c.released:
                w.requests -= 1
                w.tokens -= c.tokens
            c.released = True
        # Released charges are dropped once they reach the front.
        while q and q[0].released:
            q.popleft()

    def _window(self, key: object, now: float) -> _Window:
        w = self._keys.get(key)
        if w is None:
            w = self._keys[key] = _Window()
        self._expire(w, now)
        return w

    def _snapshot(self, w: _Window, rpm: int, tpm: int, now: float) -> Snapshot:
        live = next((c for c in w.charges if not c.released), None)
        reset = max(0.0, live.at + self.window - now) if live else 0.0
        return Snapshot(rpm, tpm, rpm - w.requests if rpm else 0, tpm - w.tokens if tpm else 0, reset)

    def _wait_for_tokens(self, w: _Window, need: int, tpm: int, now: float) -> float:
        """Seconds until `need` more tokens fit under `tpm`."""
        excess = w.tokens + need - tpm
        for c in w.charges:
            if c.released:
                continue
            excess -= c.tokens
            if excess <= 0:
                return max(c.at + self.window - now, 0.001)
        return self.window

    # -- the API -------------------------------------------------------------------------------
    def take(self, key: object, rpm: int, tpm: int, now: float | None = None) -> tuple[Charge, Snapshot]:
        """Admits one request under `rpm` (0: unlimited) or raises RateLimited. A request that
        finds the token budget already spent is refused here too, before its body is read."""
        now = self.clock() if now is None else now
        with self._lock:
            w = self._window(key, now)
            if rpm and w.requests >= rpm:
                snap = self._snapshot(w, rpm, tpm, now)
                raise RateLimited(
                    f"rate limit reached: {rpm} requests per minute for this key",
                    snap.reset_s, snap, "requests",
                )
            if tpm and w.tokens >= tpm:
                snap = self._snapshot(w, rpm, tpm, now)
                raise RateLimited(
                    f"rate limit reached: {tpm} tokens per minute for this key",
                    self._wait_for_tokens(w, 1, tpm, now), snap, "tokens",
                )
            charge = Charge(key, now)
            w.charges.append(charge)
            w.requests += 1
            return charge, self._snapshot(w, rpm, tpm, now)

    def reserve(self, charge: Charge, tokens: int, rpm: int, tpm: int, now: float | None = None) -> Snapshot:
        """Adds `tokens` to the request's charge, or raises RateLimited and gives the request's
        slot back (a refused request does not count)."""
        now = self.clock() if now is None else now
        with self._lock:
            w = self._window(charge.key, now)
            if charge.released:  # already left the window: a minute-long tokenization
                return self._snapshot(w, rpm, tpm, now)
            if tpm and w.tokens + tokens > tpm:
                self._release(w, charge)
                snap = self._snapshot(w, rpm, tpm, now)
                if tokens > tpm:
                    raise RateLimited(
                        f"request too large: it may use {tokens} tokens (prompt + max_tokens), over this key's "
                        f"limit of {tpm} tokens per minute; lower max_tokens",
                        self.window, snap, "tokens",
                    )
                raise RateLimited(
                    f"rate limit reached: {tpm} tokens per minute for this key ({w.tokens} in use, {tokens} requested)",
                    self._wait_for_tokens(w, tokens, tpm, now), snap, "tokens",
                )
            charge.tokens += tokens
            w.tokens += tokens
            return self._snapshot(w, rpm, tpm, now)

    def settle(self, charge: Charge, tokens: int) -> None:
        """Replaces the reservation with the tokens really used (once)."""
        with self._lock:
            if charge.settled:
                return
            charge.settled = True
            if charge.released:
                return
            w = self._keys[charge.key]
            w.tokens += tokens - charge.tokens
            charge.tokens = tokens

    def release(self, charge: Charge) -> None:
        """Forgets a request entirely (it was refused after `take`)."""
        with self._lock:
            w = self._keys.get(charge.key)
            if w is not None:
                self._release(w, charge)

    def _release(self, w: _Window, charge: Charge) -> None:
        if not charge.released:
            charge.released = True
            w.requests -= 1
            w.tokens -= charge.tokens

    def snapshot(self, key: object, rpm: int, tpm: int, now: float | None = None) -> Snapshot:
        now = self.clock() if now is None else now
        with self._lock:
            return self._snapshot(self._window(key, now), rpm, tpm, now)

    def restore(self, charges: Iterable[tuple[object, float, int]], now: float | None = None) -> int:
        """Loads (key, admitted_at, tokens) charges, e.g. the ledger's last window after a restart."""
        now = self.clock() if now is None else now
        horizon = now - self.window
        items = sorted((c for c in charges if c[1] > horizon), key=lambda c: c[1])
        with self._lock:
            for key, at, tokens in items:
                w = self._keys.setdefault(key, _Window())
                w.charges.append(Charge(key, at, int(tokens), settled=True))
                w.requests += 1
                w.tokens += int(tokens)
            # Charges restored after live ones would break the window's time order.
            for w in self._keys.values():
                if any(a.at > b.at for a, b in zip(w.charges, list(w.charges)[1:])):
                    w.charges = deque(sorted(w.charges, key=lambda c: c.at))
        return len(items)
