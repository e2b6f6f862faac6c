"""One engine (the demo checkpoint in float32, in its own engine-core process, as under `herd
serve`) for all server tests; each test module starts its own uvicorn server on a free port, in a
thread, sharing that engine."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest

MODEL = "demo"
MAVERICK = "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8"


@pytest.fixture(scope="session")
def engine(demo_dir):
    from herd.engine.client import EngineClient

    eng = EngineClient.start(demo_dir, dtype="float32", max_num_seqs=64)  # its own engine-core process
    yield eng
    eng.shutdown()


@contextlib.contextmanager
def running_server(app):
    """Serves `app` with uvicorn in a background thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def make_server(engine, **options):
    from herd.server import ServerOptions, create_app

    options.setdefault("served_model_names", [MODEL, MAVERICK])
    return running_server(create_app(engine, ServerOptions(owns_engine=False, **options)))


@pytest.fixture(scope="module")
def base_url(engine):
    with make_server(engine) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def kv_blocks_used(http_client) -> float:
    text = http_client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith("herd:kv_cache_blocks_used{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("herd:kv_cache_blocks_used missing from /metrics")


def metric(http_client, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there are none yet)."""
    total = 0.0
    for line in http_client.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
