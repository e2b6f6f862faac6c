"""Tool calls: the parser (herd/server/tool_calls.py) and chat completions that return them.

The demo checkpoint's random weights never call a tool, so the end-to-end tests serve a scripted
engine: the real EngineClient (tokenizer, limits, chat template) whose generate() yields a fixed
reply, piece by piece, as RequestOutputs with deltas, just like the engine does.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from herd.engine.outputs import CompletionOutput, RequestOutput
from herd.server.tool_calls import (
    PYTHON_END,
    PYTHON_START,
    ToolCallStream,
    could_start_call,
    parse_tool_calls,
    split_reply,
    tool_names,
)
from tests.server.conftest import MODEL, make_server

NAMES = {"get_weather", "search", "ns.lookup"}


def _calls(text, names=NAMES):
    calls = parse_tool_calls(text, names)
    return None if calls is None else [(c.name, json.loads(c.arguments)) for c in calls]


# -- parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
        ('  {"type": "function", "name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}\n',
         [("get_weather", {"city": "Oslo", "days": 3})]),
        ('{"name": "search", "arguments": {"q": "llama"}}', [("search", {"q": "llama"})]),
        ('{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}', [("search", {"q": "x"})]),  # arguments as a string
        ('{"type": "function", "function": {"name": "search", "arguments": "{}"}}', [("search", {})]),
        ('{"name": "search"}', [("search", {})]),
        ('{"name": "search", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Rome"}}',
         [("search", {}), ("get_weather", {"city": "Rome"})]),
        ('[{"name": "search", "parameters": {"q": "a"}}, {"name": "search", "parameters": {"q": "b"}}]',
         [("search", {"q": "a"}), ("search", {"q": "b"})]),
        (PYTHON_START + '{"name": "get_weather", "parameters": {"city": "Lima"}}' + PYTHON_END,
         [("get_weather", {"city": "Lima"})]),
        (PYTHON_START + '{"name": "search", "parameters": {}}', [("search", {})]),  # cut before python_end
    ],
)
def test_json_calls(text, expected):
    assert _calls(text) == expected


def test_pythonic_calls_with_literal_kwargs():
    text = (
        '[get_weather(city="San Francisco", days=3, metric=True, when=None), '
        "search(q='a \"quoted\" word', limit=-2, score=0.5, tags=['x', \"y\"], pair=(1, 2), "
        'opts={"deep": False, "n": [1, {"k": null}]}, flag=true), ns.lookup()]'
    )
    assert _calls(text) == [
        ("get_weather", {"city": "San Francisco", "days": 3, "metric": True, "when": None}),
        ("search", {"q": 'a "quoted" word', "limit": -2, "score": 0.5, "tags": ["x", "y"], "pair": [1, 2],
                    "opts": {"deep": False, "n": [1, {"k": None}]}, "flag": True}),
        ("ns.lookup", {}),
    ]
    assert _calls(PYTHON_START + '[search(q="x")]' + PYTHON_END) == [("search", {"q": "x"})]
    assert _calls(PYTHON_START + 'search(q="x")' + PYTHON_END) == [("search", {"q": "x"})]  # one bare call
    assert _calls('[search(q="ünïcode ☃")]') == [("search", {"q": "ünïcode ☃"})]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello! How can I help?",
        "Use {curly braces} for sets.",
        '{"answer": 42}',  # JSON, but not a call
        '{"name": "Bob", "age": 30}',  # a "name" key, but other keys too (and not a tool)
        '{"name": "search", "parameters": [1, 2]}',  # parameters must be an object
        '{"type": "object", "name": "search"}',
        '{"name": "search", "parameters": {"q": "x"}',  # unclosed
        '{"name": "search", "parameters": {"q": NaN}}',
        '{"name": "search"} and then some words',
        "[1, 2, 3]",
        "[link](https://example.com)",
        "[search(q=)]",  # syntax error
        '[search("positional")]',
        "[search(**opts)]",
        "[search(q=__import__('os').system('true'))]",  # a call inside: never evaluated, refused
        "[search(q=x)]",  # a variable
        "[search(q=1+2)]",
        "[search(q=1e999)]",
        "[search(q={1, 2})]",  # a set
        "[search(q=b'bytes')]",
        "[search(q=1)] trailing",
        '[search(q="x"), 42]',
        "[]",
        "search(q='x')",  # a bare call without the python tags is only text here (see split_reply)
        "[" * 100_000,  # deep nesting: refused, not a RecursionError
        "[search(q=" + "[" * 5000 + "]" * 5000 + ")]",
        '{"name": "search", "arguments": "{\\"q\\": NaN}"}',
    ],
)
def test_not_calls(text):
    assert split_reply(text, NAMES) == (text, None)


def test_only_the_requests_tools_count():
    assert _calls('{"name": "delete_everything", "parameters": {}}') is None
    assert _calls("[rm(path='/')]") is None
    # One unknown name among known ones: the reply is not taken as calls at all.
    assert _calls('[search(q="a"), rm(path="/")]') is None
    assert _calls('{"name": "search", "parameters": {}}', names=set()) is None
    assert split_reply('{"name": "search", "parameters": {}}', set()) == ('{"name": "search", "parameters": {}}', None)


def test_text_before_a_tagged_call():
    content, calls = split_reply("Let me look that up." + PYTHON_START + '[search(q="x")]' + PYTHON_END, NAMES)
    assert content == "Let me look that up."
    assert [(c.name, c.arguments) for c in calls] == [("search", '{"q": "x"}')]
    # Untagged JSON after prose is only text.
    text = 'Call it like {"name": "search", "parameters": {}}'
    assert split_reply(text, NAMES) == (text, None)


def test_openai_shape_and_ids():
    calls = parse_tool_calls('[search(q="a"), search(q="b")]', NAMES)
    shaped = [c.to_openai() for c in calls]
    assert [s["type"] for s in shaped] == ["function", "function"]
    assert all(s["id"].startswith("call_") for s in shaped) and shaped[0]["id"] != shaped[1]["id"]
    assert shaped[0]["function"] == {"name": "search", "arguments": '{"q": "a"}'}


def test_tool_names():
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {}}},
        {"name": "b"},
        {"type": "function", "function": {}},
        "junk",
    ]
    assert tool_names(tools) == {"a", "b"}
    assert tool_names(None) == set()


@pytest.mark.parametrize(
    "prefix, possible",
    [
        ("", True), ("{", True), ('{"', True), ('{"na', True), ('{"name"', True), ('{"type": "function"', True),
        ('{"answer"', False), ("{x", False), ("[", True), ("[{", True), ('[{"name', True), ("[sea", True),
        ("[search(", True), ("[search ]", False), ("[1", False), ("[link]", False), ("<|py", True),
        (PYTHON_START, True), ("Hello", False), ("<b>", False),
    ],
)
def test_could_start_call(prefix, possible):
    assert could_start_call(prefix) is possible


def _stream(pieces, names=NAMES, clean=lambda s: s):
    ts = ToolCallStream(names, clean)
    sent = [ts.feed(p) for p in pieces]
    rest, calls = ts.finish()
    return sent, rest, calls


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '  [search(q="a"), ns.lookup(k=1)]',
        PYTHON_START + '[search(q="a")]' + PYTHON_END,
        "Sure thing." + PYTHON_START + '{"name": "search", "parameters": {}}' + PYTHON_END,
        "Plain text that is not a call at all.",
        "[1, 2, 3] are numbers",
        '{"answer": 42}',
        '{"name": "search", "parameters": {} } and more',
        "  \n",
        "a < b and <|x",
        PYTHON_START + "not a call" + PYTHON_END,
    ],
)
def test_stream_agrees_with_split_reply(text):
    """Fed one character at a time or in one piece, the stream ends where split_reply does, and
    sends every character of the content exactly once."""
    want_content, want_calls = split_reply(text, NAMES)
    for pieces in ([text], list(text)):
        sent, rest, calls = _stream(pieces)
        assert "".join(sent) + rest == want_content
        assert [(c.name, c.arguments) for c in calls or ()] == [(c.name, c.arguments) for c in want_calls or ()]


def test_stream_sends_plain_text_at_once_and_holds_calls():
    sent, rest, calls = _stream(["Hel", "lo ", "there"])
    assert sent == ["Hel", "lo ", "there"] and rest == "" and calls is None
    sent, rest, calls = _stream(["[search", '(q="x"', ")]"])
    assert sent == ["", "", ""] and rest == "" and calls
    # Held while it could be a call, released at once when it no longer can.
    sent, rest, calls = _stream(["[", "link", "](x) and more"])
    assert sent == ["", "", "[link](x) and more"]
    # Prose goes out as it comes; the tagged call after it is held.
    sent, rest, calls = _stream(["Ok. ", PYTHON_START + "[sea", 'rch(q="x")]', PYTHON_END])
    assert sent == ["Ok. ", "", "", ""] and rest == "" and [c.name for c in calls] == ["search"]


def test_stream_cleans_content():
    strip = lambda s: s.replace("<|eot_id|>", "")  # noqa: E731
    sent, rest, calls = _stream(["Hi <|eot", "_id|> there"], clean=strip)
    assert "".join(sent) + rest == "Hi  there" and calls is None


def test_demo_tokenizer_shows_python_tags_only_when_not_skipping_specials(engine):
    """Why tool requests decode with skip_special_tokens=False: the tags vanish otherwise."""
    tok = engine.tokenizer
    ids = tok.encode(PYTHON_START + '[search(q="x")]' + PYTHON_END)
    assert tok.token_to_id(PYTHON_START) in ids
    assert tok.decode(ids, skip_special_tokens=False) == PYTHON_START + '[search(q="x")]' + PYTHON_END
    assert tok.decode(ids, skip_special_tokens=True) == '[search(q="x")]'


# -- end to end: a scripted engine behind the real server ------------------------------------


class ScriptedEngine:
    """The real EngineClient, except that generate() streams `reply` (a list of text pieces).

    Like the engine, special-token strings are left out of the text when the request's
    skip_special_tokens is set. Each piece counts as one token (ids 1000, 1001, ...)."""

    def __init__(self, real):
        self._real = real
        self.reply: list[str] = ["Hello"]
        self.finish_reason = "stop"
        self.params = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def generate(self, prompt_ids, params, request_id, prompt=None, images=None):
        self._real.check_prompt(prompt_ids, params)
        self.params.append(params)
        pieces = list(self.reply)
        if params.skip_special_tokens:
            pieces = [p.replace(PYTHON_START, "").replace(PYTHON_END, "") for p in pieces]
        texts = [""] * params.n
        ids: list[int] = []
        for step, piece in enumerate(pieces):
            last = step == len(pieces) - 1
            ids.append(1000 + step)
            outs = []
            for i in range(params.n):
                texts[i] += piece
                logprobs = {ids[-1]: -0.25} if params.logprobs is not None else None
                outs.append(
                    CompletionOutput(
                        index=i, text=texts[i], token_ids=list(ids),
                        finish_reason=self.finish_reason if last else None,
                        stop_reason=200008 if last and self.finish_reason == "stop" else None,
                        logprobs=[{t: -0.25} for t in ids] if logprobs else None,
                        delta_text=piece, delta_token_ids=[ids[-1]], delta_logprobs=[logprobs] if logprobs else [],
                    )
                )
            yield RequestOutput(request_id, list(prompt_ids), outs, finished=last)
            await asyncio.sleep(0)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, SEARCH]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
JSON_CALL = ['{"name": "get_weather", ', '"parameters": {"city": ', '"Paris"}}']


@pytest.fixture(scope="module")
def scripted(engine):
    fake = ScriptedEngine(engine)
    with make_server(fake) as url:
        yield fake, url


@pytest.fixture
def fake(scripted):
    fake = scripted[0]
    fake.reply, fake.finish_reason, fake.params = ["Hello"], "stop", []
    return fake


@pytest.fixture(scope="module")
def client(scripted):
    return openai.OpenAI(base_url=f"{scripted[1]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def raw(scripted):
    with httpx.Client(base_url=scripted[1], timeout=60) as c:
        yield c


def _sse(raw, body) -> list[dict]:
    r = raw.post("/v1/chat/completions", json={"model": MODEL, "stream": True, **body})
    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_json_call_non_streamed(fake, client):
    fake.reply = JSON_CALL
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens == 3
    # Tool requests decode with the special tokens kept, so the python tags can be seen.
    assert fake.params[-1].skip_special_tokens is False


def test_pythonic_calls_in_python_tags_non_streamed(fake, client):
    fake.reply = [PYTHON_START, '[get_weather(city="Paris"), ', "search(q='cafés', limit=5, exact=True)]", PYTHON_END]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto")
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("search", {"q": "cafés", "limit": 5, "exact": True}),
    ]
    assert len({c.id for c in msg.tool_calls}) == 2


def test_prose_then_tagged_call(fake, client):
    fake.reply = ["Let me check.", PYTHON_START, '{"type": "function", "name": "search", "parameters": {}}', PYTHON_END]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert r.choices[0].message.content == "Let me check."
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["search"]
    assert r.choices[0].finish_reason == "tool_calls"


def test_client_skipping_special_tokens_still_gets_the_call(fake, client):
    fake.reply = [PYTHON_START, '[get_weather(city="Paris")]', PYTHON_END]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, extra_body={"skip_special_tokens": True})
    assert fake.params[-1].skip_special_tokens is True
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


@pytest.mark.parametrize(
    "reply",
    [
        ["The weather ", "is {mild} today."],
        ['{"name": "delete_files", ', '"parameters": {}}'],  # not one of the request's tools
        ['{"name": "get_weather", "parameters": {"city": '],  # cut off
        ["[1, 2", ", 3]"],
    ],
)
def test_text_replies_stay_text(fake, client, raw, reply):
    fake.reply = reply
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert r.choices[0].message.content == "".join(reply)
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    chunks = _sse(raw, {"messages": ASK, "tools": TOOLS})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "".join(reply)
    assert not any("tool_calls" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_special_tokens_are_dropped_from_text_content(fake, client, raw):
    fake.reply = [PYTHON_START, "just words", PYTHON_END]
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert r.choices[0].message.content == "just words" and not r.choices[0].message.tool_calls
    deltas = [c["choices"][0]["delta"] for c in _sse(raw, {"messages": ASK, "tools": TOOLS}) if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "just words"


def test_no_tools_or_tool_choice_none_means_text(fake, client):
    fake.reply = JSON_CALL
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == "".join(JSON_CALL) and r.choices[0].finish_reason == "stop"
    assert fake.params[-1].skip_special_tokens is True
    r = client.chat.completions.create(model=MODEL, messages=ASK)
    assert r.choices[0].message.content == "".join(JSON_CALL) and not r.choices[0].message.tool_calls


def test_required_and_named_tool_choice_ask_the_engine_for_calls(fake, client):
    """A forced choice reaches the engine as a grammar of calls (tests/server/test_structured_outputs.py
    checks what the real engine then writes); "auto" stays free."""
    for choice, names in (("required", ["get_weather", "search"]), ({"type": "function", "function": {"name": "search"}}, ["search"])):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
        spec = fake.params[-1].structured_outputs.tool_calls
        assert [f["name"] for f in spec["functions"]] == names and spec["parallel"] is False
    client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert fake.params[-1].structured_outputs is None
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    client.chat.completions.create(model=MODEL, messages=ASK, tools=[strict, SEARCH])
    spec = fake.params[-1].structured_outputs.tool_calls  # "auto" with a strict tool: a call, once begun, is checked
    assert spec["auto"] is True and [f["name"] for f in spec["functions"]] == ["get_weather", "search"]
    assert spec["functions"][0]["parameters"] == WEATHER["function"]["parameters"]
    assert spec["functions"][1]["parameters"] == {"type": "object"}


@pytest.mark.parametrize(
    "body, message",
    [
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": "required"}, "needs `tools`"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "'nope'"),
    ],
)
def test_bad_tool_choice_is_a_400(raw, body, message):
    r = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tool_choice" and message in error["message"]


def test_tool_choice_auto_without_tools_is_fine(fake, raw):
    r = raw.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tool_choice": "auto"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello"


def test_streamed_call_chunks(fake, raw):
    fake.reply = [PYTHON_START, '[get_weather(city="Paris"), ', 'search(q="x")]', PYTHON_END]
    chunks = _sse(raw, {"messages": ASK, "tools": TOOLS, "stream_options": {"include_usage": True}})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert sum("role" in c["choices"][0]["delta"] for c in chunks if c["choices"]) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks[1:] if c["choices"]]
    assert not any(d.get("content") for d in deltas)
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert [len(c) for c in calls] == [1, 1, 1, 1]
    head0, args0, head1, args1 = (c[0] for c in calls)
    assert head0["index"] == 0 and head0["type"] == "function" and head0["id"].startswith("call_")
    assert head0["function"] == {"name": "get_weather", "arguments": ""}
    assert args0 == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert head1["index"] == 1 and head1["function"]["name"] == "search" and head1["id"] != head0["id"]
    assert args1 == {"index": 1, "function": {"arguments": '{"q": "x"}'}}
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finish] == ["tool_calls"]
    assert finish[0]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_streamed_prose_then_call(fake, raw):
    fake.reply = ["Checking", " now.", PYTHON_START, '{"name": "search", "parameters": {"q": 1}}', PYTHON_END]
    chunks = _sse(raw, {"messages": ASK, "tools": TOOLS})
    deltas = [c["choices"][0]["delta"] for c in chunks[1:] if c["choices"]]
    assert [d["content"] for d in deltas if d.get("content")] == ["Checking", " now."]  # sent as they came
    assert [d["tool_calls"][0]["function"] for d in deltas if "tool_calls" in d] == [
        {"name": "search", "arguments": ""}, {"arguments": '{"q": 1}'}
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_with_the_openai_sdk(fake, client):
    fake.reply = JSON_CALL
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True)
    args, names, finish = {}, {}, None
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or ():
                if tc.function.name:
                    names[tc.index] = tc.function.name
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
            finish = choice.finish_reason or finish
    assert names == {0: "get_weather"} and json.loads(args[0]) == {"city": "Paris"} and finish == "tool_calls"

    # The SDK's stream helper assembles the same message.
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS) as s:
        events = [e.type for e in s]
        final = s.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and not msg.content
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_streamed_n2_and_logprobs(fake, raw):
    fake.reply = JSON_CALL
    chunks = _sse(raw, {"messages": ASK, "tools": TOOLS, "n": 2, "logprobs": True})
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["tool_calls"]
        heads = [c["delta"]["tool_calls"][0] for c in mine if "tool_calls" in c["delta"] and "id" in c["delta"]["tool_calls"][0]]
        assert [h["function"]["name"] for h in heads] == ["get_weather"]
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["content"]]
        assert len(tokens) == 3 and all(t["logprob"] == -0.25 for t in tokens)


def test_streamed_plain_text_is_not_delayed(fake, raw):
    fake.reply = ["Sunny", " and", " warm."]
    chunks = _sse(raw, {"messages": ASK, "tools": TOOLS})
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:]] == ["Sunny", " and", " warm.", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_length_cut_call_is_text(fake, client):
    fake.reply, fake.finish_reason = JSON_CALL[:2], "length"
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "".join(JSON_CALL[:2])


# -- the real demo engine: tools change nothing for replies that are not calls --------------


def test_real_engine_text_unchanged_by_tool_parsing(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    common = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=12, temperature=0)
    parsed = client.chat.completions.create(**common)
    plain = client.chat.completions.create(**common, extra_body={"skip_special_tokens": True})
    off = client.chat.completions.create(**common, tool_choice="none")
    assert parsed.choices[0].message.content == plain.choices[0].message.content == off.choices[0].message.content
    assert not parsed.choices[0].message.tool_calls
    streamed = client.chat.completions.create(**common, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == parsed.choices[0].message.content
