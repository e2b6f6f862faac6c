"""Platform overhead: requests/s through auth + rate limit + usage ledger vs with the platform off.

Two `herd serve demo` processes run side by side, each with its own HERD_HOME (a temp dir):

  * A, `--no-platform`: no keys, no limiter, no ledger;
  * B, the platform on with `--require-api-key` and one key made beforehand
    (`herd keys create --name bench --rpm 100000 --tpm 100000000`, limits high enough never to
    throttle), every request sending `Authorization: Bearer <key>`; the ledger is SQLite in
    B's HERD_HOME.

Both get the same load: --requests (default 300) `POST /v1/chat/completions` with
`max_tokens: 1`, temperature 0 and a short prompt, from --concurrency (default 8) async httpx
workers, so the engine work per request is as small as the API allows and the per-request cost of
the HTTP and platform layers shows. Runs alternate A, B, A, B, ... (--rounds pairs); the best
round of each server is reported (the machine is shared and noisy), with every round's figures
below it. Besides req/s and client-side p50/p99 latency, each round records the server
process's CPU seconds per request (utime + stime of all its threads, from /proc), which noise
on the other core disturbs less than wall time.

Ledger check: after each B round the usage table must have grown by exactly --requests rows,
all `finished`, key = the bench key, 1 completion token each; at the end `herd usage --json`
(same HERD_HOME) must count every request sent to B (warm-up included).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_platform.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_platform.py --requests 300 --concurrency 8 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "Say hello."


def herd_exe() -> str:
    exe = Path(sys.executable).with_name("herd")
    return str(exe) if exe.exists() else (shutil.which("herd") or "herd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, name: str, platform: bool, args, work: Path):
        self.name = name
        self.platform = platform
        self.home = work / name
        self.home.mkdir()
        self.env = dict(os.environ, HERD_HOME=str(self.home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if args.threads:
            self.env["OMP_NUM_THREADS"] = str(args.threads)
        self.key = None
        if platform:
            out = subprocess.run(
                [herd_exe(), "keys", "create", "--name", "bench", "--rpm", "100000", "--tpm", "100000000"],
                env=self.env, capture_output=True, text=True, check=True,
            )
            self.key = out.stdout.strip().splitlines()[-1].strip()
        self.port = free_port()
        cmd = [herd_exe(), "serve", "demo", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(self.port),
               "--uvicorn-log-level", "warning"]
        cmd += ["--require-api-key"] if platform else ["--no-platform"]
        self.cmd = cmd
        self.log_path = work / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.base = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.model = None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                r = httpx.get(self.base + "/v1/models", headers=self.headers, timeout=5)
                if r.status_code == 200:
                    self.model = r.json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def ledger(self) -> dict:
        """Rows of the usage table, read-only straight from the SQLite file."""
        db = sqlite3.connect(f"file:{self.home / 'herd.db'}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute(
                "SELECT u.status, k.name, u.completion_tokens, COUNT(*) FROM usage u "
                "LEFT JOIN api_keys k ON k.id = u.key_id GROUP BY 1, 2, 3"
            ).fetchall()
        finally:
            db.close()
        return {"total": sum(r[3] for r in rows), "groups": [list(r) for r in rows]}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def drive(server: Server, n: int, concurrency: int) -> dict:
    body = {"model": server.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1,
            "temperature": 0}
    latencies: list[float] = []
    errors: list[str] = []
    usage_ok = 0
    todo = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.base, headers=server.headers, timeout=120, limits=limits) as client:

        async def worker():
            nonlocal usage_ok
            for _ in todo:
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                elif r.json()["usage"]["completion_tokens"] == 1:
                    usage_ok += 1

        cpu0 = proc_cpu_s(server.proc.pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = proc_cpu_s(server.proc.pid) - cpu0
    ok = n - len(errors)
    return {
        "server": server.name,
        "requests": n,
        "ok": ok,
        "usage_ok": usage_ok,
        "wall_s": wall,
        "req_s": ok / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "server_cpu_ms_per_req": 1000 * cpu / n,
        "errors": sorted(set(errors))[:3],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per server, interleaved A, B, A, B, ...")
    ap.add_argument("--warmup", type=int, default=20, help="requests per server before the first round")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS for both servers (default 1: the client needs the other core); 0: torch's default")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for a server to start")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="herd-bench-platform-")
    work = Path(tmp.name)
    servers: list[Server] = []
    try:
        off = Server("off", False, args, work)
        servers.append(off)
        off.wait_ready(args.timeout)
        on = Server("on", True, args, work)
        servers.append(on)
        on.wait_ready(args.timeout)
        print(f"servers ready ({time.perf_counter() - t_start:.0f}s); off: {' '.join(off.cmd)}", file=sys.stderr)
        print(f"on: {' '.join(on.cmd)}", file=sys.stderr)
        sent_to_on = 0
        for s in servers:
            w = asyncio.run(drive(s, args.warmup, args.concurrency))
            if w["ok"] != args.warmup:
                raise RuntimeError(f"warm-up on {s.name} failed: {w['errors']}")
        sent_to_on += args.warmup

        rounds: dict[str, list[dict]] = {"off": [], "on": []}
        ledger_checks = []
        for r in range(args.rounds):
            for s in servers:  # A, B, A, B, ...
                before = s.ledger()["total"] if s.platform else None
                res = asyncio.run(drive(s, args.requests, args.concurrency))
                res["round"] = r
                if s.platform:
                    sent_to_on += args.requests
                    time.sleep(0.2)  # the ledger is written before each response completes; no wait needed
                    after = s.ledger()
                    res["ledger_rows_added"] = after["total"] - before
                    ledger_checks.append(res["ledger_rows_added"] == args.requests)
                rounds[s.name].append(res)
                print(f"round {r} {s.name}: {res['req_s']:.1f} req/s, p50 {res['p50_ms']:.1f} ms, "
                      f"p99 {res['p99_ms']:.1f} ms, server CPU {res['server_cpu_ms_per_req']:.2f} ms/req, "
                      f"ok {res['ok']}/{res['requests']}"
                      + (f", ledger +{res['ledger_rows_added']}" if s.platform else "")
                      + (f", errors {res['errors']}" if res["errors"] else ""), file=sys.stderr)

        final = on.ledger()
        usage_cli = subprocess.run([herd_exe(), "usage", "--json"], env=on.env, capture_output=True, text=True)
        try:
            usage_json = json.loads(usage_cli.stdout)
        except json.JSONDecodeError:
            usage_json = {"stdout": usage_cli.stdout[-500:], "stderr": usage_cli.stderr[-500:]}
    finally:
        for s in servers:
            s.close()

    best = {name: max(rs, key=lambda x: x["req_s"]) for name, rs in rounds.items()}
    b_off, b_on = best["off"], best["on"]
    lines = [
        f"{args.requests} requests per round, concurrency {args.concurrency}, `POST /v1/chat/completions` "
        f"(`max_tokens: 1`, temperature 0, prompt {PROMPT!r}), demo checkpoint in float32, "
        f"OMP_NUM_THREADS={args.threads or 'default'} per server; {args.rounds} rounds per server, interleaved "
        f"(off, on, off, on, ...), best round by req/s shown.",
        "",
        "| server | req/s | p50 latency (ms) | p99 latency (ms) | server CPU ms / request | on / off (req/s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, b in (("platform off (`--no-platform`)", b_off),
                     ("platform on (`--require-api-key`, key auth + rate limit + SQLite ledger)", b_on)):
        ratio = f"{b['req_s'] / b_off['req_s']:.3f}" if b is b_on else ""
        lines.append(f"| {label} | {b['req_s']:.1f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | "
                     f"{b['server_cpu_ms_per_req']:.2f} | {ratio} |")
    lines.append("")
    lines.append("Every round (req/s; p50 / p99 ms; server CPU ms/req):")
    lines.append("")
    for name in ("off", "on"):
        cells = [f"{x['req_s']:.1f} ({x['p50_ms']:.1f} / {x['p99_ms']:.1f}; {x['server_cpu_ms_per_req']:.2f})"
                 for x in rounds[name]]
        lines.append(f"- {name}: " + ", ".join(cells))
    med = {n: statistics.median(x["req_s"] for x in rs) for n, rs in rounds.items()}
    cpu_med = {n: statistics.median(x["server_cpu_ms_per_req"] for x in rs) for n, rs in rounds.items()}
    lines.append(f"- medians: off {med['off']:.1f} req/s, on {med['on']:.1f} req/s (on/off {med['on'] / med['off']:.3f}); "
                 f"server CPU off {cpu_med['off']:.2f}, on {cpu_med['on']:.2f} ms/req "
                 f"(+{cpu_med['on'] - cpu_med['off']:.2f} ms/req)")
    lines.append("")
    adds = [x["ledger_rows_added"] for x in rounds["on"]]
    lines.append(
        f"Ledger: rows added per platform round {adds} (expected {args.requests} each: "
        f"{'OK' if all(ledger_checks) else 'MISMATCH'}); total {final['total']} rows for {sent_to_on} requests sent "
        f"(warm-up included): {'OK' if final['total'] == sent_to_on else 'MISMATCH'}; by (status, key, completion "
        f"tokens): {final['groups']}."
    )
    lines.append(f"`herd usage --json` (same HERD_HOME): {json.dumps(usage_json)[:600]}")
    all_ok = all(x["ok"] == x["requests"] and x["usage_ok"] == x["requests"] for rs in rounds.values() for x in rs)
    lines.append(f"All responses 200 with 1 completion token: {'yes' if all_ok else 'NO'}. "
                 f"Whole run {time.perf_counter() - t_start:.0f} s.")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds, "ledger": final,
                                               "usage_json": usage_json, "sent_to_on": sent_to_on}, indent=2))
    tmp.cleanup()
    if not all(ledger_checks) or final["total"] != sent_to_on or not all_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
