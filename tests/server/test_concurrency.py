"""32 concurrent streaming clients get complete, correct streams; a client that drops mid-stream
frees its KV blocks."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from herd import LLM, SamplingParams
from tests.server.conftest import MODEL, kv_blocks_used, metric, wait_until

N_CLIENTS = 32
MAX_TOKENS = 8


def _conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Request number {i}: tell me about item {i * 7}."}]


async def _stream_one(client: httpx.AsyncClient, i: int) -> tuple[str, list[dict]]:
    body = {"model": MODEL, "messages": _conversation(i), "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    chunks = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
            elif line == "data: [DONE]":
                chunks.append("DONE")
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1] if c["choices"]), chunks


def test_32_concurrent_streams_match_offline(base_url, http, demo_dir):
    before = metric(http, "herd:request_success_total", finished_reason="length") + metric(
        http, "herd:request_success_total", finished_reason="stop"
    )

    async def run_all():
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            return await asyncio.gather(*(_stream_one(client, i) for i in range(N_CLIENTS)))

    results = asyncio.run(run_all())

    llm = LLM(demo_dir, dtype="float32")
    offline = llm.chat([_conversation(i) for i in range(N_CLIENTS)], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for i, ((text, chunks), out) in enumerate(zip(results, offline)):
        assert chunks[-1] == "DONE", f"client {i}: stream did not end with [DONE]"
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-2]["usage"]["completion_tokens"] == len(out.outputs[0].token_ids)
        assert text == out.outputs[0].text, f"client {i}"
    after = metric(http, "herd:request_success_total", finished_reason="length") + metric(
        http, "herd:request_success_total", finished_reason="stop"
    )
    assert after - before == N_CLIENTS
    assert metric(http, "herd:time_to_first_token_seconds_count") >= N_CLIENTS
    assert metric(http, "herd:e2e_request_latency_seconds_count") >= N_CLIENTS
    assert metric(http, "herd:generation_tokens_total") >= N_CLIENTS


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_kv_blocks(base_url, http, stream):
    assert wait_until(lambda: kv_blocks_used(http) == 0, timeout=60)
    aborted = metric(http, "herd:request_success_total", finished_reason="abort")
    # 8000 tokens take minutes on a CPU: blocks coming back means the request was aborted.
    body = {"model": MODEL, "messages": _conversation(1), "max_tokens": 8000, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=base_url, timeout=300) as client:
        if stream:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(6):
                    next(lines)
                assert kv_blocks_used(http) > 0
            # leaving the block closes the connection mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    # Generous deadline: this checks that the blocks come back, not how fast.
    assert wait_until(lambda: kv_blocks_used(http) == 0, timeout=60), "KV blocks were not freed"
    assert metric(http, "herd:num_requests_running") == 0
    assert metric(http, "herd:request_success_total", finished_reason="abort") == aborted + 1
    assert http.post("/v1/chat/completions", json={**body, "max_tokens": 2, "stream": False}).status_code == 200
