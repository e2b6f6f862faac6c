"""`herd serve` as a process: it serves, `herd chat --url` talks to it, and SIGTERM lets an
in-flight stream finish and exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(demo_dir):
    port = _free_port()
    herd = [sys.executable, "-m", "herd.cli"]
    proc = subprocess.Popen(
        herd + ["serve", str(demo_dir), "--port", str(port), "--dtype", "float32", "--served-model-name", "tiny",
                "--price-input", "0.27", "--price-output", "0.85", "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"herd serve did not come up:\n{proc.stdout.read()}")
        time.sleep(0.2)
    yield proc, url, herd
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_answers_with_its_options(served):
    proc, url, _ = served
    entry = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert entry["id"] == "tiny" and entry["pricing"]["input"] == 0.27 and entry["pricing"]["output"] == 0.85
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_chat_cli_against_the_server(served):
    _, url, herd = served
    r = subprocess.run(herd + ["chat", "--url", url, "--max-tokens", "4"], input="Hello\n\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().lstrip(">").strip()


def test_sigterm_finishes_in_flight_work_and_exits_0(served):
    proc, url, _ = served
    received: list[str] = []
    started = threading.Event()

    def stream():
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 48, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    received.append(line)
                    started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert proc.wait(60) == 0
    assert received[-1] == "data: [DONE]", received[-3:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
