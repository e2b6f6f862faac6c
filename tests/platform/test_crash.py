"""kill -9 while 20 streams are in flight.

The server: every response that completed has exactly one finished row, nothing is duplicated,
the next start records the cut-off ones as aborted, and no engine-core process is left behind.
The engine core: every client gets an error within 5 s, `herd serve` exits non-zero, and every
cut-off request has one failed row (the server lives on long enough to write it).
"""

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
    from herd.engine.client import EngineClient
    from herd.platform.config import PlatformConfig
    from herd.platform.db import Database
    from herd.platform.service import Platform
    from herd.server import ServerOptions, create_app

    demo_dir, db_url, port, pid_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    engine = EngineClient.start(demo_dir, dtype="float32", max_num_seqs=32)
    open(pid_file, "w").write(str(engine.core_pid))
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
    pid_file = tmp_path / "core.pid"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(demo_dir), db_url, str(port), str(pid_file)])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        core_pid = int(pid_file.read_text())
        streams = Streams(url, secret)
        assert _wait(lambda: len(streams.completed) >= 10, 60), f"only {len(streams.completed)} short streams completed"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        streams.join(30)
        assert _wait(lambda: not _alive(core_pid), 5), "the engine-core process outlived its server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    completed, cut = streams.completed, streams.cut
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


def test_kill_9_of_the_engine_core(demo_dir, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'herd.db'}"
    secret = Platform(PlatformConfig(), Database(db_url)).keys.create("crash")[1]
    port = free_port()
    env = {**os.environ, "HERD_DATABASE_URL": db_url}
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(demo_dir), "--dtype", "float32",
                             "--port", str(port), "--max-num-seqs", "32", "--uvicorn-log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        core_pid = _children(proc.pid)[0]
        streams = Streams(url, secret)
        assert _wait(lambda: len(streams.completed) >= 10, 60), f"only {len(streams.completed)} short streams completed"
        assert _wait(lambda: len(streams.started) == 20, 60)
        os.kill(core_pid, signal.SIGKILL)
        killed = time.monotonic()
        streams.join(10)
        assert len(streams.cut) == 10 and max(streams.ended_at.values()) - killed < 5, streams.ended_at
        assert all(streams.errors.get(rid) for rid in streams.cut), streams.errors  # an error event, not a bare close
        assert proc.wait(10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rows = Platform(PlatformConfig(), Database(db_url)).ledger.records()
    assert len({r.request_id for r in rows}) == len(rows) == 20
    statuses = {r.response_id: r.status for r in rows}
    assert sorted(statuses[rid] for rid in streams.cut) == ["failed"] * 10
    assert sorted(statuses[rid] for rid in streams.completed) == ["finished"] * 10


class Streams:
    """20 streamed chat requests in threads: half finish after 4 tokens, half would run for 4000."""

    def __init__(self, url: str, secret: str):
        self.completed: list[str] = []  # response ids whose [DONE] arrived
        self.cut: list[str] = []
        self.started: list[str] = []
        self.errors: dict[str, str] = {}  # response id -> the error event's message
        self.ended_at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.stream, args=(url, secret, i)) for i in range(20)]
        for t in self.threads:
            t.start()

    def stream(self, url: str, secret: str, i: int) -> None:
        body = {"model": "demo", "messages": [{"role": "user", "content": f"stream {i}"}], "stream": True,
                "max_tokens": 4 if i % 2 else 4000, "logit_bias": STOPS}
        rid = None
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {secret}"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            self.errors[rid] = chunk["error"]["message"]
                        elif rid is None:
                            rid = chunk["id"]
                            with self.lock:
                                self.started.append(rid)
                    elif line == "data: [DONE]" and rid not in self.errors:
                        with self.lock:
                            self.completed.append(rid)
                            self.ended_at[rid] = time.monotonic()
                        return
        except httpx.HTTPError:
            pass
        with self.lock:
            self.cut.append(rid)
            self.ended_at[rid] = time.monotonic()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)


def _wait_healthy(proc, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _alive(pid: int) -> bool:
    from herd.engine.client import pid_alive

    return pid_alive(pid)


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
