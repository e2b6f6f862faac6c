"""Structured outputs in the engine, on the random-weight demo checkpoint (which never writes
JSON by chance): every constrained reply follows its grammar, free requests are untouched."""

import json
import re

import jsonschema
import pytest

from herd import LLM
from herd.engine.sampling import SamplingParams
from tests.structured.schemas import SCHEMAS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def llm(demo_dir):
    return LLM(str(demo_dir), dtype="float32", device="cpu", block_size=4)


def _json(schema, **kw):
    return SamplingParams(max_tokens=kw.pop("max_tokens", 96), structured_outputs={"json": schema}, **kw)


def test_schemas_in_one_batch_parse_and_validate(llm):
    params = [_json(s, temperature=0.8, seed=i) for i, s in enumerate(SCHEMAS)]
    outs = llm.generate(["Write JSON."] * len(params), params)
    for schema, out in zip(SCHEMAS, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        value = json.loads(o.text)  # strict: a raw control character in a string fails here
        jsonschema.validate(value, schema)


def test_free_requests_keep_their_tokens_beside_constrained_ones(llm):
    free = SamplingParams(max_tokens=8, temperature=0)
    alone = llm.generate(["Once upon a time", "The sky"], free)
    mixed = llm.generate(
        ["Once upon a time", "Write JSON.", "The sky", "Pick."],
        [free, _json(SCHEMAS[0], temperature=0), free, SamplingParams(max_tokens=8, structured_outputs={"choice": ["a", "b"]})],
    )
    assert [o.outputs[0].token_ids for o in alone] == [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids]
    assert mixed[3].outputs[0].text in ("a", "b")


def test_regex_choice_and_grammars(llm):
    specs = [
        ({"regex": "[a-z]{3}-[0-9]{2}"}, lambda t: re.fullmatch("[a-z]{3}-[0-9]{2}", t)),
        ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
        ({"grammar": 'root ::= "a" ("b" | "c"){1,5}'}, lambda t: re.fullmatch("a[bc]{1,5}", t)),  # GBNF
        ({"grammar": 'start: "x" DIGIT DIGIT\nDIGIT: /[0-9]/'}, lambda t: re.fullmatch("x[0-9]{2}", t)),  # Lark
        ({"json_object": True}, lambda t: t.startswith("{")),
    ]
    outs = llm.generate(["Go."] * len(specs), [SamplingParams(max_tokens=24, temperature=1.0, seed=3, structured_outputs=s) for s, _ in specs])
    for (spec, ok), out in zip(specs, outs):
        text = out.outputs[0].text
        assert ok(text), (spec, text)
        if "json_object" not in spec:
            assert out.outputs[0].finish_reason == "stop"


def test_control_characters_never_reach_a_json_string(llm):
    """Even a client that pushes newline and tab tokens up gets JSON that parses strictly."""
    tok = llm.tokenizer
    pushed = {t: 30.0 for t in set(tok.encode("\n") + tok.encode("\t") + tok.encode("a\nb") + tok.encode("\r\n"))}
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}, "required": ["s"],
              "additionalProperties": False}
    out = llm.generate("Write.", _json(schema, temperature=0, logit_bias=pushed))[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), schema)


def test_unfinished_grammar_ends_with_length_and_partial_text(llm):
    out = llm.generate("Write JSON.", _json(SCHEMAS[2], temperature=0, max_tokens=3))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith("{")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"json": '{"type": '}, "not valid JSON"),
        ({"regex": "(?=a)b"}, "look-around"),
        ({"grammar": "root ::= missing"}, "missing"),
        ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
    ],
)
def test_bad_constraints_are_refused_before_queueing(llm, spec, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=spec))
    assert not llm.engine.has_unfinished()


def test_preemption_keeps_the_matcher_right(demo_dir):
    """A cache too small for the batch forces recomputes; the replies match an unpressed run."""
    params = [_json(s, temperature=0.7, seed=10 + i, max_tokens=64) for i, s in enumerate(SCHEMAS[:4])]
    prompts = [f"Request {i}: write one JSON object for this schema, please." for i in range(4)]
    roomy = LLM(str(demo_dir), dtype="float32", device="cpu", block_size=4).generate(prompts, params)
    tight_llm = LLM(str(demo_dir), dtype="float32", device="cpu", block_size=4, kv_cache_tokens=64)
    tight = tight_llm.generate(prompts, params)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in tight] == [o.outputs[0].token_ids for o in roomy]
    for schema, out in zip(SCHEMAS, tight):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
                "additionalProperties": False}


def test_auto_tool_calls_free_unless_a_call_starts(llm):
    """tool_choice "auto" with a strict tool: text stays free, but a reply that opens a JSON object
    must be a valid call (a logit_bias towards "{" makes the random model start one)."""
    from herd.server.tool_calls import parse_tool_calls

    spec = {"tool_calls": {"functions": [{"name": "get_weather", "parameters": WEATHER_ARGS}], "parallel": False, "auto": True}}
    brace = llm.tokenizer.encode("{")[0]
    free, pushed = llm.generate(
        ["Hello", "Hello"],
        [SamplingParams(max_tokens=8, temperature=0, structured_outputs=spec),
         SamplingParams(max_tokens=48, temperature=0, structured_outputs=spec, logit_bias={brace: 40.0})],
    )
    alone = llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))[0]
    if not alone.outputs[0].text.startswith("{"):
        assert free.outputs[0].token_ids == alone.outputs[0].token_ids
    out = pushed.outputs[0]
    assert out.finish_reason == "stop", out.text
    [call] = parse_tool_calls(out.text, {"get_weather"})
    jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)


def test_logprobs_are_the_models_own_under_a_grammar(llm):
    """The mask picks the token; the reported logprobs are the model's, as for free requests."""
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=3, structured_outputs={"choice": ["yes", "no"]})
    constrained = llm.generate("Pick.", params)[0].outputs[0]
    free = llm.generate("Pick.", SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0].outputs[0]
    token = constrained.token_ids[0]
    text = llm.tokenizer.decode([token])
    assert text and ("yes".startswith(text) or "no".startswith(text))
    top_free = {t: lp for t, lp in free.logprobs[0].items()}
    top_constrained = {t: lp for t, lp in constrained.logprobs[0].items() if t != token}
    assert top_constrained == {t: lp for t, lp in top_free.items() if t != token}
    assert constrained.logprobs[0][token] < 0
