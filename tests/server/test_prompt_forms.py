"""What third-party clients send: text prompts with or without a BOS of their own, and message
content as a list of OpenAI parts."""

import pytest


def _prompt_tokens(http, prompt) -> int:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 1, "temperature": 0}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_completions_never_double_the_bos(http, engine):
    tok = engine.tokenizer
    plain = _prompt_tokens(http, "Hello there")
    assert plain == len(tok.encode("Hello there")) + 1  # Llama 4's tokenizer adds <|begin_of_text|>
    assert _prompt_tokens(http, "<|begin_of_text|>Hello there") == plain
    ids = http.post("/tokenize", json={"model": "demo", "prompt": "<|begin_of_text|>Hello there"}).json()["tokens"]
    assert ids.count(tok.bos_token_id) == 1


def _chat(client, model, content, *, stream):
    """A chat request as vLLM's `bench serve --backend openai-chat` sends it."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.0,
        "max_completion_tokens": 6,
        "stream": stream,
        "ignore_eos": True,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
        import json

        text, usage = "", None
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                    usage = chunk.get("usage") or usage
        return text, usage["prompt_tokens"]
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    reply = response.json()
    return reply["choices"][0]["message"]["content"], reply["usage"]["prompt_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_text_parts_with_a_parts_template(http, stream):
    """Llama 4's template iterates over parts: a text part renders as the same string would."""
    as_string = _chat(http, "demo", "Say hello", stream=stream)
    assert _chat(http, "demo", [{"type": "text", "text": "Say hello"}], stream=stream) == as_string
