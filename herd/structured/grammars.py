"""A request's constraint as llguidance grammar text, and the check that rejects a bad one at
request time (no tokenizer needed, so the API server can run it before anything is queued)."""

from __future__ import annotations

import json
from functools import lru_cache

from herd.structured.spec import StructuredOutputsParams

# JSON is written compactly, with the separators models are trained on. No free whitespace at
# all is the strictest cap on it: other servers' JSON can run out of tokens in endless spaces.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for `spec` (raises ValueError for input that is not a grammar)."""
    import llguidance

    matcher = llguidance.LLMatcher
    kind = spec.kind
    if kind == "json":
        return matcher.grammar_from_json_schema(_schema(spec.json), defaults=JSON_OPTIONS)
    if kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return matcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    if kind == "grammar":
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(spec.grammar)  # GBNF (`root ::= ...`) is converted, Lark kept
        except Exception as e:
            raise ValueError(f"the grammar could not be read: {e}") from None
        return matcher.grammar_from_lark(lark)
    return matcher.grammar_from_lark(_tool_calls_lark(spec.tool_calls))


def _schema(value) -> dict | bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise ValueError("a JSON schema must be an object")
    return value


def _tool_calls_lark(spec: dict) -> str:
    """Calls in the JSON form Llama 4's chat template teaches, `{"name": ..., "parameters": {...}}`;
    several separated by "; " when parallel calls are allowed (herd's tool-call parser reads both)."""
    calls = []
    for fn in spec["functions"]:
        parameters = fn.get("parameters") or {"type": "object"}
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema = {"x-guidance": JSON_OPTIONS, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}
    repeat = ' ("; " call)*' if spec.get("parallel", True) else ""
    lines = [f"calls: call{repeat}", f"call: %json {json.dumps(schema)}"]
    if spec.get("auto"):
        # Text that does not open a JSON object is free; a reply that does (or a call after
        # <|python_start|>) must be calls.
        lines = ["start: TEXT | calls | TEXT? <|python_start|> calls <|python_end|>?", r"TEXT: /[^{][\s\S]*/", *lines]
    else:
        lines = ["start: calls", *lines]
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=512)
def _check(key: str, text: str) -> str:
    import llguidance

    return llguidance.LLMatcher.validate_grammar(text)


def validate(spec: StructuredOutputsParams) -> None:
    """Raises ValueError naming the problem when `spec` cannot be enforced: an invalid schema, a
    schema keyword the library cannot enforce, a regex or grammar it rejects."""
    try:
        text = grammar_text(spec)
        error = _check(spec.key(), text)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the library makes of odd input is the client's 400
        error = str(e) or type(e).__name__
    if error:
        raise ValueError(f"invalid {_WHAT[spec.kind]}: {error.strip()}")


_WHAT = {
    "json": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "tool_calls": "tool parameters schema",
}
