"""/openapi.json tells the truth: Schemathesis sends valid and invalid requests built from it to
a running server (the demo checkpoint) and checks every answer against it: no 5xx, every status
and content type declared, every body of the declared shape. Example counts stay small (CI):
about 6 valid and 4 invalid requests per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks

# Generation stays short: a completion of at most 2 tokens, 2 samples.
_CAPS = {"max_tokens": 2, "max_completion_tokens": 2, "n": 2, "min_tokens": 2, "prompt_logprobs": 2}


def _capped(case):
    body = case.body
    if isinstance(body, dict):
        for name, cap in _CAPS.items():
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[name] = cap
    return case


@pytest.fixture
def exact_floats():
    """The engine, built in this thread, set flush-to-zero here (a per-thread CPU setting): the
    request generator needs subnormal floats. The engine's own thread keeps its setting."""
    import torch

    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(base_url + "/openapi.json")


def test_schema_describes_bodies_and_real_content_types(http):
    spec = http.get("/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"400", "401", "404", "413", "415", "429", "500", "503"} <= set(chat["responses"])
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/html" in spec["paths"]["/playground"]["get"]["responses"]["200"]["content"]
    assert "content" not in spec["paths"]["/health"]["get"]["responses"]["200"]  # an empty body
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_tokens", "top_p", "context_length_exceeded_behavior"} <= set(props)


# What the schema promises. Not positive_data_acceptance: a request of the right shape can still
# be refused (an unknown model, a prompt over the context, token ids outside the vocabulary).
CHECKS = [not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, checks.negative_data_rejection]
# Files and batches live in the platform database; this server runs without it and answers them 501.
PLATFORM_ONLY = ("/v1/files", "/v1/batches")

MODES = {schemathesis.GenerationMode.POSITIVE: 6, schemathesis.GenerationMode.NEGATIVE: 4}


@pytest.mark.parametrize("mode", list(MODES), ids=lambda m: m.value)
def test_every_answer_is_declared(api_schema, mode, exact_floats):
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith(PLATFORM_ONLY):
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MODES[mode], deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            _capped(case).call_and_validate(timeout=60, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:  # an operation with nothing to make invalid (no body, no parameters)
            assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
        except Exception as e:  # collect all operations' failures, then report them together
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
