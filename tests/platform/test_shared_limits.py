"""One budget per key across processes: two processes, each its own app with the platform
middleware on one database (SQLite file, or PostgreSQL when configured), as `--api-server-count 2`
or two herd servers sharing a PostgreSQL. A key limited to 10 requests per minute gets exactly 10
answers between them, then 429s, and the ledger has one row per answered request."""

from __future__ import annotations

import asyncio
import multiprocessing
from types import SimpleNamespace

from herd.platform.config import Limits, PlatformConfig
from herd.platform.db import Database
from herd.platform.middleware import install  # imported here, once: the forked processes inherit it
from herd.platform.service import Platform

REQUESTS_PER_PROCESS = 10
RPM = 10


def _app(db_url: str):
    from fastapi import FastAPI
    from starlette.responses import JSONResponse

    from herd.platform.meter import observe, reserve

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():  # what the real route tells the platform, without an engine
        await reserve(5, 3)
        observe(SimpleNamespace(request_id="chatcmpl-x", prompt_token_ids=[1] * 5, num_generated_tokens=3,
                                num_cached_tokens=0))
        return JSONResponse({"id": "chatcmpl-x"})

    install(app, Platform(PlatformConfig(), Database(db_url)), model="m")
    return app


def _serve(db_url: str, secret: str, barrier, results) -> None:
    import httpx

    app = _app(db_url)

    async def burst(n):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://herd", headers=headers) as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json={}) for _ in range(n)))
        return [(r.status_code, r.json().get("error", {}).get("code"), r.headers.get("x-ratelimit-limit"))
                for r in replies]

    first = asyncio.run(burst(1))  # warm: the key's lookup and the worker's connection
    barrier.wait(30)
    together = asyncio.run(burst(REQUESTS_PER_PROCESS - 1))
    barrier.wait(30)
    after = asyncio.run(burst(2))  # both processes' grants are in: nothing is left
    results.put((first + together, after))


def test_two_processes_share_one_budget(db_url):
    rpm = RPM
    setup = Platform(PlatformConfig(limits=Limits(rpm=600, tpm=0)), Database(db_url))
    key, secret = setup.keys.create("shared", rpm=rpm, tpm=0)
    ctx = multiprocessing.get_context("fork")  # herd is imported already; a fresh interpreter takes seconds
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_serve, args=(db_url, secret, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        replies = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    during = [r for during, _ in replies for r in during]
    after = [r for _, after in replies for r in after]
    assert len(during) == 2 * REQUESTS_PER_PROCESS
    assert sorted(status for status, _, _ in during).count(200) == rpm  # exactly the limit, between them
    assert all(code == "rate_limit_exceeded" for status, code, _ in during if status != 200)
    assert all(status == 429 and limit == str(rpm) for status, _, limit in after)
    rows = setup.ledger.records(key_id=key.id)
    assert len(rows) == rpm and all(r.status == "finished" for r in rows)  # one row per answered request
    assert sum(r.completion_tokens for r in rows) == 3 * rpm
    assert setup.limiter.snapshot(key.id, rpm, 0).requests_remaining == 0
