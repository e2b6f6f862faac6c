"""`herd serve --tensor-parallel-size 2` as a process: the openai SDK gets the tokens TP=1
gives, and kill -9 of a worker rank mid-stream fails the stream, ends the server with a
non-zero status within 30 s and leaves no process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from herd import LLM, SamplingParams

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def served(demo_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "herd.cli", "serve", str(demo_dir), "--port", str(port), "--dtype", "float32",
         "--served-model-name", "tiny", "--tensor-parallel-size", "2", "--no-platform", "--uvicorn-log-level", "warning",
         "--kv-cache-tokens", "4096"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"herd serve did not come up:\n{proc.stdout.read()}")
        time.sleep(0.5)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_openai_sdk_gets_the_single_device_tokens(served, demo_dir):
    _, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    got = [client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text
           for p in PROMPTS]
    llm = LLM(str(demo_dir), dtype="float32", device="cpu", kv_cache_tokens=4096)
    want = [r.outputs[0].text for r in llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))]
    assert got == want


def test_killed_worker_fails_the_stream_and_ends_the_server(served):
    proc, url = served
    # The server's child is the engine core (rank 0); the worker ranks are the core's children.
    cores = _children(proc.pid)
    workers = [w for core in cores for w in _children(core)]
    assert workers, "the engine core has no worker process"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=2000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    received = 0
    with pytest.raises(Exception) as failure:
        for _ in stream:
            received += 1
            if received == 3:
                for pid in workers:
                    os.kill(pid, signal.SIGKILL)
    assert received >= 3
    # The stream ends with an error event: the step failure, or the engine core having exited on it.
    assert any(word in str(failure.value).lower() for word in ("fail", "error", "died")), failure.value
    killed_at = time.monotonic()
    status = proc.wait(timeout=30)
    assert status != 0
    assert time.monotonic() - killed_at < 30
    assert not [pid for pid in cores + workers if _alive(pid)]
