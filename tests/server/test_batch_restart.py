"""kill -9 `herd serve` in the middle of a batch, start it again: the batch resumes and completes
with every custom_id exactly once in the output and exactly one ledger row per line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai

from herd.platform.db import Database
from herd.platform.schema import usage

LINES = 12
STOPS = {t: -100 for t in ("200001", "200007", "200008")}  # no early stop: every line takes max_tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(demo_dir, home, port):
    env = {**os.environ, "HERD_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "herd.cli", "serve", str(demo_dir), "--port", str(port), "--dtype", "float32",
         "--served-model-name", "demo", "--uvicorn-log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"herd serve did not come up:\n{proc.stderr.read()}")
        time.sleep(0.2)


def test_kill_9_mid_batch_then_resume(demo_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "herd.toml").write_text("[batch]\nmax_in_flight = 1\n")  # slow enough to be cut mid-way
    lines = [
        {"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "demo", "messages": [{"role": "user", "content": f"line {i}"}], "max_tokens": 8,
                  "temperature": 0, "logit_bias": STOPS}}
        for i in range(LINES)
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    port = _free_port()
    proc, url = _start(demo_dir, home, port)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        f = c.files.create(file=path.open("rb"), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while c.batches.retrieve(b.id).request_counts.completed < 3:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        db = Database(f"sqlite:///{home / 'herd.db'}")
        with db.read() as conn:
            before = conn.execute(usage.select().where(usage.c.batch.is_(True))).all()
        assert 3 <= len(before) < LINES, "kill -9 should land mid-batch"

        proc, url = _start(demo_dir, home, port)
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 180
        while (b := c.batches.retrieve(b.id)).status != "completed":
            assert b.status in ("in_progress", "finalizing"), b
            assert time.monotonic() < deadline, b
            time.sleep(0.1)
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (LINES, LINES, 0)
        out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in out) == sorted(x["custom_id"] for x in lines)  # each exactly once
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == 8 for o in out)
        with db.read() as conn:
            rows = conn.execute(usage.select().where(usage.c.batch.is_(True))).mappings().all()
        assert sorted(r["request_id"] for r in rows) == sorted(f"{b.id}-{n}" for n in range(1, LINES + 1))
        assert all(r["status"] == "finished" and r["completion_tokens"] == 8 for r in rows)
        db.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
