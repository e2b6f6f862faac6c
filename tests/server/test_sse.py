"""The exact bytes of the SSE streams, read with raw httpx."""

from __future__ import annotations

import json

from tests.server.conftest import MODEL


def _events(http, path, body) -> list[str]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    for e in events[:-1]:
        assert e.startswith("data: ") and "\n" not in e, repr(e)
    return [e[len("data: "):] for e in events[:-1]]


def test_chat_sse_format(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "n": 2, "logprobs": True, "top_logprobs": 1}
    events = _events(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in ch["delta"] for ch in mine[1:])
        assert [ch["finish_reason"] for ch in mine].count(None) == len(mine) - 1
        assert mine[-1]["finish_reason"] == "length"
        tokens = [t for ch in mine if ch["logprobs"] for t in ch["logprobs"]["content"]]
        assert len(tokens) == 4 and all(len(t["top_logprobs"]) == 1 for t in tokens)
    # usage: null until the finish chunk, then on it, then OpenAI's extra usage-only chunk
    with_usage = [c for c in chunks if c["usage"] is not None]
    assert len(with_usage) == 2
    assert with_usage[0]["choices"][0]["finish_reason"] and with_usage[1]["choices"] == []
    assert with_usage[1]["usage"]["completion_tokens"] == 8
    assert with_usage[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == with_usage[1]["usage"]["cached_tokens"]


def test_completions_sse_format(http):
    body = {"model": MODEL, "prompt": ["Hi", "Bye"], "max_tokens": 3, "temperature": 0, "stream": True}
    events = _events(http, "/v1/completions", body)
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_error_before_streaming_is_a_status_not_an_event(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": -1, "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_playground_page_is_served(http):
    page = http.get("/playground")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "herd playground" in page.text and "/v1/chat/completions" in page.text
    assert http.get("/", follow_redirects=False).headers["location"] == "/playground"
