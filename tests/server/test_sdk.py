"""The official openai and together SDKs as clients of a real server."""

from __future__ import annotations

import openai
import pytest
import together

from tests.server.conftest import MAVERICK, MODEL

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tog(base_url):
    # together 3.x takes the bare host and adds /v1 itself.
    return together.Together(base_url=base_url, api_key="unused", max_retries=0)


def test_openai_chat_response_and_usage(oai):
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    assert raw.headers["x-request-id"]
    r = raw.parse()
    assert r.object == "chat.completion"
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == 6 or choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    body = raw.http_response.json()
    assert body["usage"]["cached_tokens"] == body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert body["prompt"] == []


def test_openai_stream_equals_non_streamed(oai):
    full = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].usage is not None  # usage also on the finish chunk


def test_openai_stream_helper_builds_one_assistant_message(oai):
    with oai.chat.completions.stream(model=MODEL, messages=HELLO, max_tokens=5, temperature=0) as stream:
        for _ in stream:
            pass
        snapshot = stream.current_completion_snapshot
    assert snapshot.choices[0].message.role == "assistant"
    assert snapshot.choices[0].message.content


def test_openai_logprobs(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert bytes(item.bytes).decode("utf-8", "replace")


def test_together_logprobs_integer_form(tog):
    r = tog.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.token_ids) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)


def test_together_documented_example_unchanged_but_for_url(tog):
    # Together's documented call; max_tokens cut from 1024 to keep the test fast on a CPU.
    r = tog.chat.completions.create(
        model=MAVERICK, messages=[{"role": "user", "content": "Explain quantum computing"}], max_tokens=16
    )
    assert r.choices[0].message.content
    assert r.model == MODEL  # the primary served name answers for every alias
    assert r.choices[0].finish_reason in ("stop", "length")


def test_together_streaming(tog):
    chunks = list(tog.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, stream=True))
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None


def test_together_v1_base_url_means_v1_v1(base_url):
    client = together.Together(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0)
    assert r.choices[0].text


def test_n_and_seed(oai):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=6, temperature=1.0, n=3)
    a = oai.chat.completions.create(seed=7, **kw)
    b = oai.chat.completions.create(seed=7, **kw)
    c = oai.chat.completions.create(seed=8, **kw)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in sorted(a.choices, key=lambda ch: ch.index)] == [0, 1, 2]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1
    assert a.usage.completion_tokens == 18


def test_stop_string(oai):
    full = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0).choices[0]
    text = full.message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    r = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(stop)]
    streamed = oai.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stop=stop,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_roles_developer_tool_and_prefill(oai, http):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
    r = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=3, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert r.choices[0].message.content
    # The prefill is continued, not answered: the prompt ends inside the assistant message.
    tok = http.post("/tokenize", json={"messages": messages, "continue_final_message": True, "tools": tools,
                                       "return_token_strs": True}).json()
    assert tok["count"] == r.usage.prompt_tokens
    assert "".join(tok["token_strs"]).endswith("It is")


def test_openai_completions(oai, http):
    r = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion"
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.text_offset) == 5
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    # the same prompt as token ids gives the same text
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    r2 = oai.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert r2.choices[0].text == c.text
    # a list of prompts, n each
    r3 = oai.completions.create(model=MODEL, prompt=["Once upon a time", "Hi"], max_tokens=3, temperature=0, n=2)
    assert [ch.index for ch in r3.choices] == [0, 1, 2, 3]
    assert r3.choices[0].text == r3.choices[1].text == c.text[: len(r3.choices[0].text)]


def test_completions_echo_and_stream(oai):
    r = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text.startswith("Once upon")
    lp = c.logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    plain = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0)
    streamed = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=3, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == plain.choices[0].text
    assert c.text == "Once upon" + plain.choices[0].text


def test_models(oai, http, base_url):
    ids = [m.id for m in oai.models.list()]
    assert ids == [MODEL, MAVERICK]
    m = oai.models.retrieve(MAVERICK)
    assert m.id == MAVERICK
    entry = http.get("/v1/models").json()["data"][0]
    assert entry["context_length"] == 8192 and entry["type"] == "chat" and set(entry["pricing"]) >= {"input", "output"}
    bare = http.get("/v1/models", headers={"User-Agent": "Together/Python 2.3.0"}).json()
    assert isinstance(bare, list) and bare[0]["id"] == MODEL
    assert http.get("/v1/v1/models").json()["data"][0]["id"] == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


def test_cached_tokens_on_a_repeated_prompt(http):
    messages = [{"role": "user", "content": "a long shared prefix " * 20}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0}
    http.post("/v1/chat/completions", json=body)
    usage = http.post("/v1/chat/completions", json=body).json()["usage"]
    assert usage["cached_tokens"] > 0
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["cached_tokens"]


def test_truncate_caps_max_tokens(http):
    ids = [200000] + [1922] * 8185  # 8186 tokens of an 8192-token context
    body = {"model": MODEL, "prompt": ids, "max_tokens": 100, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and "8192" in r.json()["error"]["message"] and "8286" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={**body, "context_length_exceeded_behavior": "truncate"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 6


def test_tokenize_detokenize_version_health(http):
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tok["tokens"][0] == 200000 and tok["max_model_len"] == 8192
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "<|begin_of_text|>Hello world"
    assert http.get("/version").json()["version"]
    assert http.get("/health").status_code == 200
