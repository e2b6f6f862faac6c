import pytest
from sqlalchemy import select

from herd.platform.db import Database
from herd.platform.keys import KEY_PREFIX, KeyStore, KeyStoreError, hash_secret
from herd.platform.schema import api_keys


def test_create_stores_only_a_hash(db):
    store = KeyStore(db)
    key, secret = store.create("alice", rpm=10, tpm=1000)
    assert secret.startswith(KEY_PREFIX) and len(secret) >= 40
    assert (key.name, key.rpm, key.tpm, key.active) == ("alice", 10, 1000, True)
    assert secret.startswith(key.prefix) and len(key.prefix) < len(secret) // 2
    with db.read() as conn:
        row = conn.execute(select(api_keys)).mappings().one()
    assert secret not in [str(v) for v in row.values()]
    assert row["secret_hash"] == hash_secret(secret)
    _, other = store.create("bob")
    assert other != secret


def test_authenticate_and_revoke_at_once(db):
    store = KeyStore(db)
    key, secret = store.create("alice")
    assert store.authenticate(secret).id == key.id
    assert store.authenticate(secret + "x") is None
    assert store.authenticate("") is None
    assert store.authenticate("herd-" + "a" * 10_000) is None
    # Revoked through another handle on the same database (as `herd keys revoke` beside a server).
    other = KeyStore(Database(db.url))
    revoked = other.revoke("alice")
    assert revoked.revoked_at is not None and not revoked.active
    assert store.authenticate(secret) is None
    assert store.count_active() == 0
    assert other.revoke(str(key.id)).revoked_at == revoked.revoked_at  # revoking again changes nothing


def test_names_ids_and_prefixes(db):
    store = KeyStore(db)
    a, sa = store.create("alice")
    b, _ = store.create("bob", rpm=0)
    with pytest.raises(KeyStoreError, match="already exists"):
        store.create("alice")
    with pytest.raises(KeyStoreError, match="name"):
        store.create("  ")
    with pytest.raises(KeyStoreError, match="rpm"):
        store.create("carol", rpm=-1)
    assert store.find("bob").id == b.id
    assert store.find(str(a.id)).id == a.id
    assert store.find(a.prefix).id == a.id
    with pytest.raises(KeyStoreError, match="no key"):
        store.find("nobody")
    # A revoked name can be used again; the name then means the active key.
    store.revoke("alice")
    a2, sa2 = store.create("alice")
    assert store.find("alice").id == a2.id
    assert [k.name for k in store.list()] == ["alice", "bob", "alice"]
    assert [k.id for k in store.list(include_revoked=False)] == [b.id, a2.id]
    assert store.authenticate(sa) is None and store.authenticate(sa2).id == a2.id
    assert store.count_active() == 2
