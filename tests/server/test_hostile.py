"""Hostile input: requests that can never run are refused at once (400 naming the limit), error
messages speak of the request (never of herd's code), odd but valid values are taken."""

from __future__ import annotations

import json

import pytest

from tests.server.conftest import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_more_sequences_than_ever_admitted_is_400_not_503(http):
    # The test engine admits 4 x 64 = 256 sequences at once.
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["x"] * 1024, "max_tokens": 1})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_sequences" and error["param"] == "prompt"
    assert "256" in error["message"] and "1024" in error["message"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"], "n": 128, "max_tokens": 1})
    assert r.status_code == 400 and "384" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={**CHAT, "n": 16, "max_tokens": 1})  # under the limit: runs
    assert r.status_code == 200, r.text


def test_prompt_plus_max_tokens_over_the_context_is_400(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 8192})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "8192" in error["message"]


@pytest.mark.parametrize("kwargs", [{"messages": []}, {"add_generation_prompt": False, "tools": None}])
def test_template_kwargs_cannot_replace_request_fields(http, kwargs):
    r = http.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": kwargs})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "chat_template_kwargs"
    assert "()" not in error["message"] and "build_chat_prompt" not in error["message"]


def test_tiny_positive_top_p_is_taken(http):
    # Raw bytes: this test process runs the engine too, whose flush-to-zero setting would make the
    # client itself serialise 5e-324 as 0.0.
    body = json.dumps({**CHAT, "temperature": 1})[:-1] + ', "top_p": 5e-324}'
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None,
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize"])
def test_json_routes_refuse_the_types_browsers_send_cross_site(http, path, content_type):
    body = json.dumps({**CHAT, "prompt": "Hi"}).encode()
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(path, content=body, headers=headers)
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "unsupported_media_type" and error["type"] == "invalid_request_error"


def test_json_with_a_charset_is_json(http):
    r = http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(),
                  headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_no_cors_unless_configured(http):
    pre = http.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in pre.headers
    r = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_playground_requests_are_json(http):
    # The page posts with Content-Type application/json (same origin, so no CORS is involved).
    page = http.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"Content-Type": "application/json"' in page.text


# -- huge prompts ----------------------------------------------------------------------------

def test_a_long_text_is_tokenized_in_the_other_process_exactly(http, engine):
    from herd.tokenizer import OFFLOAD_CHARS

    text = "The quick brown fox jumps over the lazy dog. " * (2 * OFFLOAD_CHARS // 45)  # ~2,000 tokens
    assert len(text) > OFFLOAD_CHARS
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == engine.tokenizer.encode(text, add_special_tokens=True)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", ["prompt", "messages"])
def test_a_text_over_the_context_is_refused_with_its_count(http, field):
    text = "word " * 20_000  # 100 KB: tokenized (in the other process), then refused
    if field == "prompt":
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1})
    else:
        r = http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == field
    assert "8192" in error["message"]


def test_more_messages_than_the_context_has_tokens_is_400(http):
    r = http.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "x"}] * 9000})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages" and "8191" in error["message"]


def _hostile_bodies() -> list[bytes]:
    ten_mb = 10 * 1024 * 1024
    words = ("lorem ipsum dolor sit amet " * (ten_mb // 27))[:ten_mb]
    return [
        json.dumps({"model": MODEL, "prompt": words, "max_tokens": 1}).encode(),
        json.dumps({**CHAT, "messages": [{"role": "user", "content": "a" * ten_mb}]}).encode(),
        json.dumps({**CHAT, "messages": [{"role": "user", "content": "hi"}] * 300_000}).encode(),
    ]


def test_huge_prompts_stall_no_one_and_leave_no_memory_behind(base_url):
    import threading
    import time

    import httpx
    import psutil

    bodies = _hostile_bodies()  # encoded up front: this process is the server's too
    process = psutil.Process()
    stop = threading.Event()
    latencies: list[float] = []

    def poll():
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while not stop.is_set():
                start = time.perf_counter()
                assert client.get("/v1/models").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)

    with httpx.Client(base_url=base_url, timeout=120) as client:
        def send(body):
            r = client.post("/v1/chat/completions" if b'"messages"' in body else "/v1/completions",
                            content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, r.text[:300]

        for body in bodies:  # warm up (first-use allocations are not a leak)
            send(body)
        before = process.memory_info().rss
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            for i in range(10):
                send(bodies[i % len(bodies)])
        finally:
            stop.set()
            poller.join()
        after = process.memory_info().rss
    assert len(latencies) > 10
    assert max(latencies) < 0.5, f"/v1/models waited {max(latencies):.2f} s"
    assert after - before < 100 * 2**20, f"RSS grew by {(after - before) / 2**20:.0f} MB"
