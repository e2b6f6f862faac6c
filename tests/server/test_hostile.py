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
    r = http.post("/v1/chat/completions", json={**CHAT, "n": 128})  # 128 alone fits
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
