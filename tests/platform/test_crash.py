"""kill -9 the server while 20 streams are in flight: every response that completed has exactly
one finished row, nothing is duplicated, and the next start records the cut-off ones as aborted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx

from herd.platform.config import PlatformConfig
from herd.platform.db import Database
from herd.platform.service import Platform

SERVER = textwrap.dedent(
    """
    import sys, uvicorn
    from herd.engine.engine import AsyncEngine
    from herd.platform.config import PlatformConfig
    from herd.platform.db import Database
    from herd.platform.service import Platform
    from herd.server import ServerOptions, create_app

    demo_dir, db_url, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = AsyncEngine.from_pretrained(demo_dir, dtype="float32", max_num_seqs=32)
    platform = Platform(PlatformConfig(), Database(db_url))
    app = create_app(engine, ServerOptions(served_model_names=["demo"]), platform=platform)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    """
)
STOPS = {t: -100 for t in ("200001", "200007", "200008")}  # never stop early: lengths are set by max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kill_9_with_streams_in_flight(demo_dir, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'herd.db'}"
    db = Database(db_url)
    secret = Platform(PlatformConfig(), db).keys.create("crash")[1]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(demo_dir), db_url, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

        completed: list[str] = []  # response ids whose [DONE] arrived
        cut: list[str] = []
        lock = threading.Lock()

        def stream(i: int) -> None:
            # Half finish quickly, half run long enough to be cut off by the kill.
            body = {"model": "demo", "messages": [{"role": "user", "content": f"stream {i}"}], "stream": True,
                    "max_tokens": 4 if i % 2 else 4000, "logit_bias": STOPS}
            rid = None
            try:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {secret}"}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            rid = json.loads(line[6:])["id"]
                        elif line == "data: [DONE]":
                            with lock:
                                completed.append(rid)
                            return
            except httpx.HTTPError:
                pass
            with lock:
                cut.append(rid)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        assert _wait(lambda: len(completed) >= 10, 60), f"only {len(completed)} short streams completed"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    assert len(completed) + len(cut) == 20 and cut, (len(completed), len(cut))
    platform = Platform(PlatformConfig(), Database(db_url))
    rows = platform.ledger.records()
    assert len({r.request_id for r in rows}) == len(rows) == 20  # every admitted request once, no duplicates
    by_response = {r.response_id: r for r in rows if r.response_id}
    for rid in completed:
        assert by_response[rid].status == "finished", rid
    running = [r for r in rows if r.status == "running"]
    assert len(running) == len(cut)
    platform.start()  # the restart
    after = {r.request_id: r.status for r in platform.ledger.records()}
    assert sorted(after.values()) == sorted(["finished"] * len(completed) + ["aborted"] * len(cut))


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
