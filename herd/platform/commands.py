"""`herd keys create|list|revoke` and `herd usage`. herd/cli.py registers them with
`add_arguments(sub)` on its subparsers; each sets `func`, which returns the exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="herd.toml (default: $HERD_HOME/herd.toml when it exists)")
    p.add_argument("--database", default=None,
                   help="database URL, e.g. postgresql://user@host/db (default: the config's, else $HERD_HOME/herd.db)")


def add_arguments(sub) -> None:
    """Adds `keys` and `usage` to an argparse subparsers object."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="{create,list,revoke}")
    ksub.required = True

    p = ksub.add_parser("create", help="create a key and print its secret (shown only once)")
    p.add_argument("--name", required=True)
    p.add_argument("--rpm", type=int, default=None, help="requests per minute (default: the config's; 0: unlimited)")
    p.add_argument("--tpm", type=int, default=None, help="tokens per minute (default: the config's; 0: unlimited)")
    _common(p)
    p.set_defaults(func=cmd_keys_create)

    p = ksub.add_parser("list", help="list keys (never their secrets)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_keys_list)

    p = ksub.add_parser("revoke", help="revoke a key at once")
    p.add_argument("key", help="the key's name, id, or the prefix `herd keys list` shows")
    _common(p)
    p.set_defaults(func=cmd_keys_revoke)

    p = sub.add_parser("usage", help="usage and cost by key, model and day")
    p.add_argument("--key", default=None, help="only this key (name, id or prefix)")
    p.add_argument("--since", default=None, help="first UTC day, YYYY-MM-DD")
    p.add_argument("--until", default=None, help="last UTC day, YYYY-MM-DD")
    p.add_argument("--days", type=int, default=None, help="the last N UTC days (today included)")
    p.add_argument("--by", default="key,model,day", help="grouping: any of key, model, day (comma-separated)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_usage)


def _open(args):
    from herd.platform.config import load_config
    from herd.platform.db import Database

    config = load_config(args.config)
    return config, Database(args.database or config.resolved_database_url())


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _limit(v: int | None, default: int) -> str:
    v = default if v is None else v
    return "unlimited" if v == 0 else str(v)


def cmd_keys_create(args) -> int:
    from herd.platform.keys import KeyStore, KeyStoreError

    config, db = _open(args)
    try:
        key, secret = KeyStore(db).create(args.name, rpm=args.rpm, tpm=args.tpm)
    except KeyStoreError as e:
        print(f"herd keys create: {e}", file=sys.stderr)
        return 1
    print(
        f"created key {key.id} {key.name!r} (rpm {_limit(key.rpm, config.limits.rpm)}, "
        f"tpm {_limit(key.tpm, config.limits.tpm)}); its secret follows and is not shown again:",
        file=sys.stderr,
    )
    print(secret)
    return 0


def cmd_keys_list(args) -> int:
    from herd.platform.keys import KeyStore

    config, db = _open(args)
    keys = KeyStore(db).list()
    if args.json:
        print(json.dumps([
            {"id": k.id, "name": k.name, "prefix": k.prefix, "rpm": k.rpm, "tpm": k.tpm,
             "created_at": k.created_at, "revoked_at": k.revoked_at} for k in keys
        ], indent=2))
        return 0
    if not keys:
        print("no keys: herd serves without API keys (create one with `herd keys create --name NAME`)")
        return 0
    rows = [("ID", "NAME", "PREFIX", "RPM", "TPM", "CREATED", "REVOKED")]
    for k in keys:
        rows.append((str(k.id), k.name, k.prefix + "...", _limit(k.rpm, config.limits.rpm),
                     _limit(k.tpm, config.limits.tpm), _when(k.created_at), _when(k.revoked_at)))
    _table(rows)
    return 0


def cmd_keys_revoke(args) -> int:
    from herd.platform.keys import KeyStore, KeyStoreError

    _, db = _open(args)
    try:
        key = KeyStore(db).revoke(args.key)
    except KeyStoreError as e:
        print(f"herd keys revoke: {e}", file=sys.stderr)
        return 1
    print(f"revoked key {key.id} {key.name!r} ({key.prefix}...) at {_when(key.revoked_at)}")
    return 0


def cmd_usage(args) -> int:
    from herd.platform.keys import KeyStore, KeyStoreError
    from herd.platform.ledger import Ledger, utc_day

    config, db = _open(args)
    by = tuple(b.strip() for b in args.by.split(",") if b.strip())
    key_id = None
    if args.key:
        try:
            key_id = KeyStore(db).find(args.key).id
        except KeyStoreError as e:
            print(f"herd usage: {e}", file=sys.stderr)
            return 1
    since = args.since
    if args.days:
        since = utc_day(time.time() - 86400 * (args.days - 1))
    try:
        rows = Ledger(db, config).summary(key_id=key_id, since=since, until=args.until, by=by)
    except ValueError as e:
        print(f"herd usage: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no usage recorded")
        return 0
    head = []
    if "day" in by:
        head.append("DAY")
    if "key" in by:
        head.append("KEY")
    if "model" in by:
        head.append("MODEL")
    head += ["REQUESTS", "ABORTED", "FAILED", "RETRIED", "PROMPT", "CACHED", "COMPLETION", "IMAGES", "COST USD",
             "BATCH", "BATCH USD"]
    table = [tuple(head)]
    for r in sorted(rows, key=lambda r: (r.get("day", ""), r.get("key_name") or "", r.get("model", ""))):
        cells = []
        if "day" in by:
            cells.append(r["day"])
        if "key" in by:
            cells.append(r["key_name"] or "(no key)")
        if "model" in by:
            cells.append(r["model"])
        cells += [str(r[k]) for k in ("requests", "aborted", "failed", "retries", "prompt_tokens", "cached_tokens",
                                      "completion_tokens", "images")]
        cells.append(f"{r['cost_usd']:.6f}")
        cells += [str(r["batch_requests"]), f"{r['batch_cost_usd']:.6f}"]  # batch lines, included in the above
        table.append(tuple(cells))
    _table(table)
    total_cost = sum(r["cost_usd"] for r in rows)
    total_in = sum(r["prompt_tokens"] for r in rows)
    total_out = sum(r["completion_tokens"] for r in rows)
    print(f"\ntotal: {sum(r['requests'] for r in rows)} requests, {total_in} prompt + {total_out} completion tokens, "
          f"${total_cost:.6f}")
    batch_requests = sum(r["batch_requests"] for r in rows)
    if batch_requests:
        discount = config.batch.discount
        print(f"of which batch: {batch_requests} requests, {sum(r['batch_tokens'] for r in rows)} tokens, "
              f"${sum(r['batch_cost_usd'] for r in rows):.6f} (batch discount {discount:.0%})")
    models = sorted({r["model"] for r in rows if "model" in r})
    for m in models:
        p = config.price_for(m)
        print(f"{m}: ${p.input:g} input / ${p.output:g} output per 1M tokens; ${p.blended:.3f} blended (3:1)")
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
