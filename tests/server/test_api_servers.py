"""`herd serve --api-server-count 2`: two HTTP processes on one port in front of one engine
core. Both answer, a key's requests-per-minute limit is one budget across them, SIGTERM drains
and exits 0, and no process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from herd.platform.config import PlatformConfig
from herd.platform.db import Database
from herd.platform.service import Platform
from tests.platform.test_crash import _alive, _children, _wait, _wait_healthy, free_port


def test_two_api_servers_share_one_engine_core_and_one_limit(demo_dir, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'herd.db'}"
    secret = Platform(PlatformConfig(), Database(db_url)).keys.create("limited", rpm=10)[1]
    port = free_port()
    env = {**os.environ, "HERD_DATABASE_URL": db_url}
    proc = subprocess.Popen([sys.executable, "-m", "herd.cli", "serve", str(demo_dir), "--dtype", "float32",
                             "--port", str(port), "--api-server-count", "2", "--uvicorn-log-level", "warning"],
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, timeout=300)  # the core loads, then both API servers start
        children = _children(proc.pid)
        assert len(children) == 3, children  # the engine core and two API servers
        api_servers = [pid for pid in children if "herd.cli" in open(f"/proc/{pid}/cmdline").read()]
        assert len(api_servers) == 2

        body = {"model": "demo", "prompt": "Hello", "max_tokens": 2}
        headers = {"Authorization": f"Bearer {secret}"}
        statuses = []
        for _ in range(12):  # a new connection each: the kernel spreads them over both processes
            with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
                statuses.append(c.post("/v1/completions", json=body).status_code)
        assert statuses == [200] * 10 + [429] * 2, statuses

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert _wait(lambda: not any(_alive(pid) for pid in children), 10), "a child outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
