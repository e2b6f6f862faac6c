"""API keys: a random secret shown once, stored only as its SHA-256 (a 256-bit random secret needs
no salt or slow hash: nothing can be guessed from the digest). `authenticate` looks the key up
every time; the server caches its answers for a few seconds (herd.platform.service)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from herd.platform.db import Database
from herd.platform.schema import api_keys

KEY_PREFIX = "herd-"
_PREFIX_SHOWN = len(KEY_PREFIX) + 8


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    rpm: int | None  # None: the configured default
    tpm: int | None
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _row(r) -> ApiKey:
    return ApiKey(r.id, r.name, r.prefix, r.rpm, r.tpm, r.created_at, r.revoked_at)


_COLUMNS = (api_keys.c.id, api_keys.c.name, api_keys.c.prefix, api_keys.c.rpm, api_keys.c.tpm,
            api_keys.c.created_at, api_keys.c.revoked_at)


class KeyStoreError(ValueError):
    pass


class KeyStore:
    def __init__(self, db: Database):
        self.db = db
        self.changes = 0  # bumped by every create and revoke through this store (caches compare it)

    def create(self, name: str, *, rpm: int | None = None, tpm: int | None = None) -> tuple[ApiKey, str]:
        """Returns the key and its secret; the secret is not stored and cannot be shown again."""
        name = name.strip()
        if not name:
            raise KeyStoreError("a key needs a name")
        for label, v in (("rpm", rpm), ("tpm", tpm)):
            if v is not None and v < 0:
                raise KeyStoreError(f"{label} must be >= 0 (0: unlimited)")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        try:
            with self.db.write() as conn:
                key_id = conn.execute(
                    insert(api_keys).values(
                        name=name, prefix=secret[:_PREFIX_SHOWN], secret_hash=hash_secret(secret),
                        rpm=rpm, tpm=tpm, created_at=now,
                    ).returning(api_keys.c.id)
                ).scalar_one()
        except IntegrityError:
            raise KeyStoreError(f"an active key named {name!r} already exists") from None
        self.changes += 1
        return ApiKey(key_id, name, secret[:_PREFIX_SHOWN], rpm, tpm, now, None), secret

    def list(self, *, include_revoked: bool = True) -> list[ApiKey]:
        q = select(*_COLUMNS).order_by(api_keys.c.id)
        if not include_revoked:
            q = q.where(api_keys.c.revoked_at.is_(None))
        with self.db.read() as conn:
            return [_row(r) for r in conn.execute(q)]

    def get(self, key_id: int) -> ApiKey | None:
        with self.db.read() as conn:
            r = conn.execute(select(*_COLUMNS).where(api_keys.c.id == key_id)).first()
        return _row(r) if r else None

    def find(self, ref: str) -> ApiKey:
        """An active key by name, id, or the prefix `herd keys list` shows; else a revoked one."""
        keys = self.list()
        matches = [k for k in keys if k.name == ref] or [k for k in keys if str(k.id) == ref]
        if not matches and len(ref) >= len(KEY_PREFIX) + 4:
            matches = [k for k in keys if k.prefix.startswith(ref) or ref.startswith(k.prefix)]
        active = [k for k in matches if k.active]
        if len(active) == 1:
            return active[0]
        if len(active) > 1:
            raise KeyStoreError(f"{ref!r} names {len(active)} keys; use the id from `herd keys list`")
        if matches:
            return matches[-1]
        raise KeyStoreError(f"no key {ref!r}")

    def revoke(self, ref: str) -> ApiKey:
        key = self.find(ref)
        if not key.active:
            return key
        now = time.time()
        with self.db.write() as conn:
            conn.execute(
                update(api_keys).where(api_keys.c.id == key.id, api_keys.c.revoked_at.is_(None)).values(revoked_at=now)
            )
        self.changes += 1
        return self.get(key.id)

    def count(self, *, include_revoked: bool = False) -> int:
        q = select(func.count()).select_from(api_keys)
        if not include_revoked:
            q = q.where(api_keys.c.revoked_at.is_(None))
        with self.db.read() as conn:
            return conn.execute(q).scalar_one()

    def count_active(self) -> int:
        return self.count()

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key with this secret, or None. One indexed lookup per call, so a revoked key
        stops working on the next request, whichever process revoked it."""
        if not secret or len(secret) > 256:
            return None
        digest = hash_secret(secret)
        with self.db.read() as conn:
            r = conn.execute(
                select(*_COLUMNS, api_keys.c.secret_hash).where(api_keys.c.secret_hash == digest)
            ).first()
        # The lookup compares digests, not secrets; the check below is constant-time anyway.
        if r is None or not hmac.compare_digest(r.secret_hash, digest) or r.revoked_at is not None:
            return None
        return _row(r)
