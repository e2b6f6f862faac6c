"""Reply bodies and stream chunks have OpenAI's shapes, field by field, as the openai SDK's models
declare them: every field validates, and an optional field with nothing in it is null or absent
(never an empty list such as `tool_calls: []`, which clients take for "there are tool calls")."""

import json
import typing

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def check_shape(model: type[BaseModel], body, where="body"):
    """`body` validates as `model`, and recursively: optional fields are never empty containers."""
    model.model_validate(body)
    for name, field in model.model_fields.items():
        if name not in body:
            assert not field.is_required(), f"{where}.{name} is required by the openai SDK"
            continue
        value = body[name]
        if _optional(field.annotation):
            assert value not in ([], {}), f"{where}.{name} is {value!r}: OpenAI sends null or leaves it out"
        nested = _models_in(field.annotation)
        if not nested or value is None:
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            check_shape(nested[0], item, f"{where}.{name}[{i}]" if isinstance(value, list) else f"{where}.{name}")


def _events(http, path, body):
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2}, {"n": 2, "seed": 1, "temperature": 1}])
def test_chat_reply_and_chunks(http, extra):
    body = {**CHAT, **extra}
    reply = http.post("/v1/chat/completions", json=body).json()
    check_shape(ChatCompletion, reply)
    assert all("tool_calls" not in c["message"] for c in reply["choices"])
    for chunk in _events(http, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}):
        check_shape(ChatCompletionChunk, chunk, "chunk")


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2, "echo": True}])
def test_completion_reply_and_chunks(http, extra):
    body = {"model": "demo", "prompt": "Hello", "max_tokens": 4, "temperature": 0, **extra}
    check_shape(Completion, _as_sdk_declares(http.post("/v1/completions", json=body).json()))
    chunks = _events(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        if chunk["choices"]:  # the usage-only chunk has no choices, as OpenAI's
            check_shape(Completion, _as_sdk_declares(chunk), "chunk")


def _as_sdk_declares(body):
    """Two nulls the OpenAI API itself sends where the SDK's Completion model has no None (the
    SDK builds its models without validating): finish_reason in a stream's unfinished chunks,
    and the echoed first prompt token's logprob. Filled in so the rest is checked strictly."""
    body = json.loads(json.dumps(body))
    for choice in body["choices"]:
        choice["finish_reason"] = choice["finish_reason"] or "stop"
        lp = choice.get("logprobs")
        if lp and lp.get("token_logprobs") and lp["token_logprobs"][0] is None:
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    return body
