"""Hostile prompts against `herd serve demo`: how long other clients wait, and what memory stays.

One server process (whatever `herd.cli` the PYTHONPATH gives, so an older checkout can be
measured the same way). A thread polls GET /v1/models every 10 ms while the main thread sends
10 MB prompts one after another: words to /v1/completions, one letter repeated as a chat
message, and 300,000 short chat messages. Reported: the longest and median /v1/models wait,
each hostile request's time and status, and the server's RSS (and its children's: the
tokenizer worker) after one warm-up round and after all rounds.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_hostile.py --rounds 3 [--size 900000]

10 MB texts are refused by their length alone on the demo (8,192-token context, longest token 113
characters); --size 900000 makes the server tokenize them in full (in its tokenizer process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import psutil

TEN_MB = 10 * 1024 * 1024


def bodies(model: str, size: int) -> list[tuple[str, str, bytes]]:
    words = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    mb = f"{size / 2**20:.1f} MB"
    return [
        (f"{mb} of words", "/v1/completions", json.dumps({"model": model, "prompt": words, "max_tokens": 1}).encode()),
        (f"{mb} of one letter", "/v1/chat/completions", json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "a" * size}], "max_tokens": 1}).encode()),
        ("300,000 messages", "/v1/chat/completions", json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "hi"}] * 300_000, "max_tokens": 1}).encode()),
    ]


def rss_mb(proc: psutil.Process) -> tuple[float, float]:
    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
    return proc.memory_info().rss / 2**20, children / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three hostile requests after a warm-up")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--size", type=int, default=TEN_MB,
                    help="characters per long prompt (under 8192 x 113 the demo tokenizes them: no length bound)")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tempfile.mkdtemp(prefix="bench-hostile-")
    cmd = [sys.executable, "-m", "herd.cli", "serve", "demo", "--dtype", "float32", "--no-platform",
           "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    env = dict(os.environ, HERD_HOME=home, HF_HUB_OFFLINE="1")
    server = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            try:
                if httpx.get(base + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        proc = psutil.Process(server.pid)
        requests = bodies("demo", args.size)
        client = httpx.Client(base_url=base, timeout=600)

        def send(name, path, body):
            start = time.perf_counter()
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            return name, r.status_code, time.perf_counter() - start, r.json().get("error", {}).get("message", "")[:90]

        rss_start = rss_mb(proc)
        warm = [send(*req) for req in requests]
        rss_warm = rss_mb(proc)
        stop = threading.Event()
        waits: list[float] = []

        def poll():
            with httpx.Client(base_url=base, timeout=600) as poller:
                while not stop.is_set():
                    t = time.perf_counter()
                    poller.get("/v1/models")
                    waits.append(time.perf_counter() - t)
                    time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        results = []
        try:
            for _ in range(args.rounds):
                results += [send(*req) for req in requests]
        finally:
            stop.set()
            poller.join()
        rss_end = rss_mb(proc)
        print(f"load average before: {os.getloadavg()}")
        print(f"context: {args.max_model_len or 'the demo default (8192)'}")
        for name, status, seconds, message in warm + results:
            print(f"  {name:22s} {status} {seconds:6.2f} s  {message}")
        print(f"/v1/models while hostile requests ran: {len(waits)} polls, longest {max(waits):.3f} s, "
              f"median {statistics.median(waits) * 1000:.1f} ms")
        print(f"server RSS MB (process, children): start {rss_start[0]:.0f}/{rss_start[1]:.0f}, after warm-up "
              f"{rss_warm[0]:.0f}/{rss_warm[1]:.0f}, after {args.rounds} rounds {rss_end[0]:.0f}/{rss_end[1]:.0f}")
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
