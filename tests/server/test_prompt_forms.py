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
