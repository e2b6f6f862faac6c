"""Structured outputs through the HTTP API on the demo checkpoint (random weights: it never
writes JSON or calls a tool by chance, so every valid reply here is the grammar's doing)."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import MODEL
from tests.structured.schemas import SCHEMAS

ASK = [{"role": "user", "content": "Reply in JSON."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": False},
    },
}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 6}}, "required": ["q"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def _stream_text(http, body) -> tuple[str, str, list]:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "stream": True, **body})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    return text, finish[-1], calls


def test_json_schema_and_together_form_streamed_and_not(client, http):
    for i, schema in enumerate(SCHEMAS[:4]):
        forms = [{"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
                 {"type": "json_object", "schema": schema}]  # Together's form: the schema is enforced
        form = forms[i % 2]
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=96, temperature=0.8, seed=i,
                                           response_format=form)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        text, finish, _ = _stream_text(http, {"messages": ASK, "max_tokens": 96, "seed": i, "response_format": form})
        assert finish == "stop"
        jsonschema.validate(json.loads(text), schema)


def test_openai_sdk_parse_with_a_pydantic_model(client):
    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        legs: int = pydantic.Field(ge=0, le=8)
        kind: str = pydantic.Field(pattern="^(cat|dog)$")

    r = client.chat.completions.parse(model=MODEL, messages=ASK, max_tokens=64, response_format=Pet)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog")


def test_vllm_structured_outputs_through_extra_body(client):
    cases = [
        ({"regex": "[A-Z][a-z]{2} [0-9]{3}"}, lambda t: re.fullmatch("[A-Z][a-z]{2} [0-9]{3}", t)),
        ({"choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"grammar": 'root ::= "(" [0-9]{1,3} ")"'}, lambda t: re.fullmatch(r"\([0-9]{1,3}\)", t)),
        ({"json": SCHEMAS[1]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS[1]) is None),
    ]
    for spec, ok in cases:
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=24, extra_body={"structured_outputs": spec})
        assert ok(r.choices[0].message.content), (spec, r.choices[0].message.content)
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=8, extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert r.choices[0].text in ("up", "down")


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format.json_schema.schema", "uniqueItems"),
        ({"response_format": {"type": "json_object", "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}},
         "response_format.schema", "strnig"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"structured_outputs": {"regex": "(?<=a)b"}}, "structured_outputs", "look-around"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs", "nothing"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
          "tool_choice": "required"}, "tools", "not"),
    ],
)
def test_bad_constraints_are_400s(http, body, param, message):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def _check_calls(calls, allowed):
    assert calls
    for call in calls:
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_choice_required_named_and_none(client):
    named = {"type": "function", "function": {"name": "search"}}
    for seed in range(2):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=64, seed=seed, temperature=1.0)
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message.tool_calls, {"get_weather", "search"})
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                           parallel_tool_calls=False, max_tokens=64, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1
        _check_calls(r.choices[0].message.tool_calls, {"search"})
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason != "tool_calls"


def test_forced_tool_call_streamed(http):
    _, finish, calls = _stream_text(http, {"messages": ASK, "tools": TOOLS, "max_tokens": 64, "parallel_tool_calls": False,
                                           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert finish == "tool_calls"
    heads = [c for c in calls if "id" in c]
    assert len(heads) == 1 and heads[0]["function"]["name"] == "get_weather"
    arguments = "".join(c["function"].get("arguments") or "" for c in calls)
    jsonschema.validate(json.loads(arguments), PARAMS["get_weather"])


def test_openai_pydantic_function_tool(client):
    class Lookup(pydantic.BaseModel):
        word: str = pydantic.Field(max_length=6)
        limit: int = pydantic.Field(ge=1, le=3)

    tool = openai.pydantic_function_tool(Lookup)
    r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=[tool], max_tokens=64,
                                      tool_choice={"type": "function", "function": {"name": "Lookup"}})
    call = r.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Lookup)
