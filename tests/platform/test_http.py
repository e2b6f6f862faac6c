"""The platform mounted on the real server, driven by the openai SDK: keys, 401s, revocation,
429s with Together's headers, and ledger rows that match the responses' usage exactly."""

from __future__ import annotations

import contextlib
import json

import httpx
import openai
import pytest

from herd.platform.config import Limits, PlatformConfig
from herd.platform.db import Database
from herd.platform.service import Platform
from tests.server.conftest import running_server, wait_until

MODEL = "demo"
EOT = "200008"  # <|eot|> in the Llama 4 vocabulary
STOP_TOKENS = ("200001", "200007", "200008")  # <|end_of_text|>, <|eom|>, <|eot|>


@pytest.fixture(scope="module")
def engine(demo_dir):
    from herd.engine.client import EngineClient

    eng = EngineClient.start(demo_dir, dtype="float32", max_num_seqs=32)
    yield eng
    eng.shutdown()


@contextlib.contextmanager
def serve(engine, db_url, limits=Limits(), require_api_key=False):
    from herd.server import ServerOptions, create_app

    platform = Platform(PlatformConfig(limits=limits), Database(db_url), require_api_key=require_api_key)
    app = create_app(engine, ServerOptions(owns_engine=False, served_model_names=[MODEL]), platform=platform)
    with running_server(app) as url:
        yield url, platform


def client(url, key="none", **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, **kw)


def chat(c, content="Hello", **kw):
    kw.setdefault("max_tokens", 8)
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_open_server_records_exact_usage(engine, db_url):
    with serve(engine, db_url) as (url, platform):
        c = client(url)  # no keys exist: any key (the SDK insists on one) is let through
        r = chat(c, temperature=0)
        rec = wait_record(platform, r.id)
        assert (rec.status, rec.key_id, rec.model, rec.path, rec.http_status) == ("finished", None, MODEL,
                                                                                   "/v1/chat/completions", 200)
        assert (rec.prompt_tokens, rec.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)
        assert rec.cached_tokens == r.model_extra.get("cached_tokens", 0)
        assert rec.cost_usd == pytest.approx((rec.prompt_tokens * 0.27 + rec.completion_tokens * 0.85) / 1e6)
        assert rec.reserved_tokens == r.usage.prompt_tokens + 8
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert "x-ratelimit-limit" not in raw.headers  # no key, no limits


def wait_record(platform, response_id):
    found = []

    def look():
        found[:] = [r for r in platform.ledger.records() if r.response_id == response_id and r.status != "running"]
        return bool(found)

    assert wait_until(look, 10), f"no ledger row for {response_id}"
    assert len(found) == 1
    return found[0]


def test_keys_401_and_revocation(engine, db_url):
    with serve(engine, db_url) as (url, platform):
        key, secret = platform.keys.create("alice")
        with pytest.raises(openai.AuthenticationError) as e:
            chat(client(url, "herd-wrong"))
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # open paths stay open

        c = client(url, secret)
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_headers={"x-stainless-retry-count": "2"})
        body = raw.parse()
        for h in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "x-tokenlimit-limit",
                  "x-tokenlimit-remaining"):
            assert h in raw.headers
        assert raw.headers["x-ratelimit-limit"] == "600"
        rec = wait_record(platform, body.id)
        assert (rec.key_id, rec.retry_count) == (key.id, 2)
        assert c.models.list().data[0].id == MODEL  # keyed non-metered routes work, with headers

        platform.keys.revoke("alice")  # as `herd keys revoke` would, from anywhere
        with pytest.raises(openai.AuthenticationError):
            chat(c)


def test_burst_gets_429_with_headers(engine, db_url):
    with serve(engine, db_url, Limits(rpm=3, tpm=100_000)) as (url, platform):
        _, secret = platform.keys.create("bursty")
        c = client(url, secret)
        for _ in range(3):
            chat(c, max_tokens=2)
        with pytest.raises(openai.RateLimitError) as e:
            chat(c, max_tokens=2)
        h = e.value.response.headers
        assert int(h["retry-after"]) >= 1 and int(h["retry-after-ms"]) >= 1
        assert (h["x-ratelimit-limit"], h["x-ratelimit-remaining"]) == ("3", "0")
        assert e.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        # Refused requests are not billed.
        assert len([r for r in platform.ledger.records() if r.status != "running"]) == 3


def test_tokens_reserved_then_settled(engine, db_url):
    with serve(engine, db_url, Limits(rpm=0, tpm=2000, default_reserve_tokens=500)) as (url, platform):
        _, secret = platform.keys.create("tokens")
        c = client(url, secret)
        with pytest.raises(openai.RateLimitError, match="too large"):
            chat(c, max_tokens=5000)
        # It reserves prompt + 1000 but stops at once (the bias makes <|eot|> the first token).
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1000, logit_bias={EOT: 100})
        # A whole body's headers go out after the engine finished: settled to real usage.
        usage = raw.parse().usage
        assert usage.completion_tokens <= 1
        assert int(raw.headers["x-tokenlimit-remaining"]) == 2000 - usage.total_tokens
        assert raw.headers["x-tokenlimit-limit"] == "2000"


def test_streaming_record_before_done_and_usage_route(engine, db_url):
    with serve(engine, db_url) as (url, platform):
        key, secret = platform.keys.create("streamer")
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "Count"}], "max_tokens": 12,
                   "stream": True, "stream_options": {"include_usage": True}, "n": 2}
        headers = {"Authorization": f"Bearer {secret}"}
        usage, rid, rec_at_done = None, None, None
        with httpx.stream("POST", url + "/v1/chat/completions", json=payload, headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    # The row is complete before [DONE] reaches the client.
                    rec_at_done = [x for x in platform.ledger.records() if x.response_id == rid]
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    rid = chunk["id"]
                    usage = chunk.get("usage") or usage
        assert rec_at_done and rec_at_done[0].status == "finished"
        rec = rec_at_done[0]
        assert (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (
            usage["prompt_tokens"], usage["completion_tokens"], usage["cached_tokens"])

        # Completions with two prompts: one row, the sum of both.
        c = client(url, secret)
        r = c.completions.create(model=MODEL, prompt=["one two", "three four five"], max_tokens=3)
        rows = [x for x in platform.ledger.records() if x.path.endswith("/completions") and "chat" not in x.path]
        assert len(rows) == 1
        assert (rows[0].prompt_tokens, rows[0].completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)

        u = httpx.get(url + "/v1/usage", headers=headers).json()
        assert u["key"] == {"id": key.id, "name": "streamer"}
        assert u["total"]["requests"] == 2
        assert u["total"]["prompt_tokens"] == rec.prompt_tokens + r.usage.prompt_tokens
        assert u["data"][0]["price_per_1m"]["blended_3_1"] == pytest.approx(0.415)
        other = platform.keys.create("other")[1]
        assert httpx.get(url + "/v1/usage", headers={"Authorization": f"Bearer {other}"}).json()["total"]["requests"] == 0


def test_aborted_and_failed(engine, db_url):
    with serve(engine, db_url) as (url, platform):
        _, secret = platform.keys.create("k")
        headers = {"Authorization": f"Bearer {secret}"}
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "Go"}], "max_tokens": 2000,
                   "stream": True, "logit_bias": {t: -100 for t in STOP_TOKENS}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=payload, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
        # The client went away: aborted, billed for what was computed.
        assert wait_until(lambda: any(x.status == "aborted" for x in platform.ledger.records()), 15)
        rec = next(x for x in platform.ledger.records() if x.status == "aborted")
        assert rec.completion_tokens >= 1 and rec.prompt_tokens > 0 and rec.cost_usd > 0

        r = httpx.post(url + "/v1/chat/completions", headers=headers,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -5})
        assert r.status_code == 400
        failed = [x for x in platform.ledger.records() if x.status == "failed"]
        assert len(failed) == 1 and failed[0].http_status == 400 and failed[0].completion_tokens == 0


def test_require_api_key_without_keys(engine, db_url):
    with serve(engine, db_url, require_api_key=True) as (url, platform):
        with pytest.raises(openai.AuthenticationError):
            chat(client(url))
