"""`herd keys` and `herd usage` through argparse, as herd/cli.py will register them."""

import argparse
import json

import pytest

from herd.platform import commands
from herd.platform.config import MAVERICK
from herd.platform.db import Database
from herd.platform.keys import KeyStore
from herd.platform.ledger import Ledger, UsageRecord, utc_day


def run(argv, url):
    parser = argparse.ArgumentParser(prog="herd")
    commands.add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([*argv, "--database", url])
    return args.func(args)


@pytest.fixture
def url(db_url):
    return db_url


def test_keys_create_list_revoke(url, capsys):
    assert run(["keys", "create", "--name", "alice", "--rpm", "10"], url) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("herd-") and "\n" not in secret  # stdout is the secret alone
    assert "not shown again" in err and "rpm 10" in err
    store = KeyStore(Database(url))
    assert store.authenticate(secret).name == "alice"

    assert run(["keys", "create", "--name", "alice"], url) == 1
    assert "already exists" in capsys.readouterr().err

    assert run(["keys", "list"], url) == 0
    out = capsys.readouterr().out
    assert "alice" in out and secret[:13] in out and secret not in out
    assert run(["keys", "list", "--json"], url) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "alice" and listed[0]["rpm"] == 10 and listed[0]["revoked_at"] is None

    assert run(["keys", "revoke", "alice"], url) == 0
    assert "revoked key" in capsys.readouterr().out
    assert store.authenticate(secret) is None
    assert run(["keys", "revoke", "nobody"], url) == 1


def test_usage(url, capsys):
    assert run(["usage"], url) == 0
    assert "no usage" in capsys.readouterr().out
    db = Database(url)
    key, _ = KeyStore(db).create("alice")
    ledger = Ledger(db)
    import time

    now = time.time()
    ledger.end(UsageRecord("a", MAVERICK, key.id, status="finished", created_at=now,
                           prompt_tokens=3000, completion_tokens=1000))
    ledger.end(UsageRecord("b", MAVERICK, None, status="aborted", created_at=now, prompt_tokens=10))
    assert run(["usage"], url) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "(no key)" in out and utc_day(now) in out
    assert "$0.415 blended (3:1)" in out
    assert run(["usage", "--key", "alice", "--by", "model", "--json", "--days", "1"], url) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{
        "model": MAVERICK, "requests": 1, "finished": 1, "aborted": 0, "failed": 0, "retries": 0,
        "prompt_tokens": 3000, "cached_tokens": 0, "completion_tokens": 1000, "images": 0,
        "cost_usd": pytest.approx((3000 * 0.27 + 1000 * 0.85) / 1e6), "total_tokens": 4000,
        "batch_requests": 0, "batch_tokens": 0, "batch_cost_usd": 0.0,
        "price_per_1m": {"input": 0.27, "output": 0.85, "blended_3_1": 0.415},
    }]
    assert run(["usage", "--by", "hour"], url) == 2
