"""Bad input gets an OpenAI-shaped 4xx naming the param, and the server keeps serving."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.server.conftest import MODEL, make_server

MSG = [{"role": "user", "content": "Hi"}]
CHAT = {"model": MODEL, "messages": MSG, "max_tokens": 2}
LIMIT = 1024 * 1024  # the body limit of this module's server


@pytest.fixture(scope="module")
def base_url(engine):
    with make_server(engine, max_request_body_bytes=LIMIT) as url:
        yield url


def chat(**fields):
    return ("/v1/chat/completions", {**CHAT, **fields})


def without(key):
    return ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != key})


# (name, path, body (dict -> JSON, bytes -> raw), status, param)
CASES = [
    ("malformed json", "/v1/chat/completions", b'{"model": "demo", "messages": [', 400, None),
    ("json array body", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("invalid utf-8", "/v1/chat/completions", b'{"model": "demo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("empty body", "/v1/chat/completions", b"", 400, None),
    ("missing model", *without("model"), 400, "model"),
    ("missing messages", *without("messages"), 400, "messages"),
    ("unknown model", *chat(model="gpt-5"), 404, "model"),
    ("empty messages", *chat(messages=[]), 400, "messages"),
    ("messages not a list", *chat(messages="hi"), 400, "messages"),
    ("wrong role", *chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("missing role", *chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("content is a number", *chat(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content"),
    ("user without content", *chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("unknown part type", *chat(messages=[{"role": "user", "content": [{"type": "video", "x": 1}]}]), 400, "messages[0].content[0].type"),
    ("text part without text", *chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400, "messages[0].content[0].text"),
    ("broken image data", *chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), 400, "messages"),
    ("image part without a url", *chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400, "messages[0].content[0].image_url.url"),
    ("negative temperature", *chat(temperature=-1), 400, "temperature"),
    ("temperature a string", *chat(temperature="hot"), 400, "temperature"),
    ("top_p zero", *chat(top_p=0), 400, "top_p"),
    ("top_p over one", *chat(top_p=1.5), 400, "top_p"),
    ("top_k below -1", *chat(top_k=-5), 400, "top_k"),
    ("min_p over one", *chat(min_p=2), 400, "min_p"),
    ("repetition_penalty zero", *chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("presence_penalty out of range", *chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty out of range", *chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("max_tokens zero", *chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", *chat(max_tokens=-1), 400, "max_tokens"),
    ("huge max_tokens", *chat(max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens a float", *chat(max_tokens=2.5), 400, "max_tokens"),
    ("n = 1000", *chat(n=1000), 400, "n"),
    ("n zero", *chat(n=0), 400, "n"),
    ("logprobs 21", *chat(logprobs=21), 400, "logprobs"),
    ("logprobs a string", *chat(logprobs="yes"), 400, "logprobs"),
    ("top_logprobs 50", *chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("logit_bias key not an id", *chat(logit_bias={"hello": 5}), 400, "logit_bias"),
    ("logit_bias id out of vocab", *chat(logit_bias={"99999999": 5}), 400, "logit_bias"),
    ("logit_bias value out of range", *chat(logit_bias={"100": 1000}), 400, "logit_bias"),
    ("stop a number", *chat(stop=5), 400, "stop"),
    ("seed a string", *chat(seed="abc"), 400, "seed"),
    ("stream_options not an object", *chat(stream=True, stream_options=3), 400, "stream_options"),
    ("bad context_length_exceeded_behavior", *chat(context_length_exceeded_behavior="explode"), 400, "context_length_exceeded_behavior"),
    ("prefill without a final assistant message", *chat(continue_final_message=True), 400, "messages"),
    ("prompt over the context", *chat(messages=[{"role": "user", "content": "word " * 9000}]), 400, "messages"),
    ("completions: missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("completions: empty prompt list", "/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("completions: token id out of range", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**7]}, 400, "prompt"),
    ("completions: negative token id", "/v1/completions", {"model": MODEL, "prompt": [-1]}, 400, "prompt"),
    ("completions: prompt a dict", "/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, 400, "prompt"),
    ("completions: logprobs true-as-int abuse", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("detokenize: id out of range", "/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("tokenize: neither prompt nor messages", "/tokenize", {"model": MODEL}, 400, "prompt"),
    ("deeply nested json", "/v1/chat/completions", ("[" * 100000 + "]" * 100000).encode(), 400, None),
]


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(http, name, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param, error
    if status == 404:
        assert error["code"] == "model_not_found"
    assert r.headers["x-request-id"]


def test_still_serving_after_bad_input(http):
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text


def test_unknown_fields_are_ignored(http):
    r = http.post("/v1/chat/completions", json={
        **CHAT, "user": "u1", "metadata": {"a": "b"}, "parallel_tool_calls": True, "store": False,
        "response_format": {"type": "json_object"}, "tool_choice": "auto", "whatever_new_field": [1, 2],
    })
    assert r.status_code == 200, r.text


def test_logprobs_true_is_not_the_integer_one(http):
    def top_counts(value):
        body = http.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "logprobs": value}).json()
        return [len(t["top_logprobs"]) for t in body["choices"][0]["logprobs"]["content"]]

    assert top_counts(True) == [0, 0]  # OpenAI's boolean: no alternatives
    assert top_counts(1) == [1, 1]  # Together's integer: one alternative per token


def test_body_over_the_limit_is_413_before_parsing(http):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024)}]})  # 10 MB string
    r = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(4):
            yield b" " * (LIMIT // 2)
        yield b"{}"

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_request_id_is_echoed_or_made(http):
    assert http.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    r = http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers={"X-Request-Id": "bad id\x01"})
    assert r.headers["x-request-id"] and r.headers["x-request-id"] != "bad id\x01"


def test_unknown_route_and_method(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]


def test_queue_full_is_503_with_retry_after(engine):
    # A server that admits one request at a time: a second, while the first streams, gets 503.
    with make_server(engine, max_pending_requests=1) as url, httpx.Client(base_url=url, timeout=60) as client:
        started = threading.Event()
        release = threading.Event()

        def hold():
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 400, "stream": True}) as r:
                for _ in r.iter_lines():
                    started.set()
                    if release.is_set():
                        break

        t = threading.Thread(target=hold)
        t.start()
        assert started.wait(30)
        r = client.post("/v1/chat/completions", json=CHAT)
        release.set()
        t.join(60)
        assert r.status_code == 503
        assert r.headers["retry-after"]
        assert r.json()["error"]["message"]
        # once the first is gone, requests are admitted again
        for _ in range(100):
            r = client.post("/v1/chat/completions", json=CHAT)
            if r.status_code == 200:
                break
        assert r.status_code == 200


def test_api_key_and_cors(engine):
    with make_server(engine, api_key="sekrit", allowed_origins=["https://play.example"]) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sekrit"})
            assert r.status_code == 200
            assert client.get("/health").status_code == 200  # probes need no key
            pre = client.options("/v1/chat/completions", headers={
                "Origin": "https://play.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"})
            assert pre.status_code == 200
            assert pre.headers["access-control-allow-origin"] == "https://play.example"
            r = client.get("/v1/models", headers={"Origin": "https://play.example", "Authorization": "Bearer sekrit"})
            assert r.headers["access-control-allow-origin"] == "https://play.example"
            r = client.get("/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer sekrit"})
            assert "access-control-allow-origin" not in r.headers
