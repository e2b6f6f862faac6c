"""What a request asks its output to follow: plain data (strings, lists, dicts), so it crosses
the process boundary to the engine core as it is; the grammar is built and compiled there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class StructuredOutputsParams:
    """Exactly one of the constraints, as in vLLM's `structured_outputs`.

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex; choice: the
    output is one of these strings; grammar: Lark or GBNF-style EBNF (`root ::= ...`);
    tool_calls: herd's own, set by the chat route from `tools` and `tool_choice`:
    {"functions": [{"name": ..., "parameters": schema}], "parallel": bool, "auto": bool}; with
    "auto" the reply may be text, and only a reply that starts a call must be a valid call.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    tool_calls: dict | None = None

    def __post_init__(self):
        chosen = [name for name in _KINDS if getattr(self, name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        if self.choice is not None and (
            not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text)")

    @property
    def kind(self) -> str:
        return next(name for name in _KINDS if getattr(self, name) not in (None, False))

    @property
    def is_json(self) -> bool:
        """JSON output: herd writes it without free whitespace and bans raw control characters."""
        if self.kind == "tool_calls":
            return not self.tool_calls.get("auto")  # free text may hold newlines
        return self.kind in ("json", "json_object")

    @classmethod
    def coerce(cls, value: Any) -> StructuredOutputsParams | None:
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(_KINDS) - {"disable_any_whitespace", "disable_additional_properties"}
            if unknown:
                raise ValueError(f"unknown structured_outputs field(s): {', '.join(sorted(unknown))}")
            return cls(**{k: v for k, v in value.items() if k in _KINDS})
        raise ValueError("structured_outputs must be an object")

    def key(self) -> str:
        """Names the constraint: equal keys compile to the same grammar (the cache key)."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        return self.kind + ":" + json.dumps(value, sort_keys=True)


_KINDS = ("json", "regex", "choice", "grammar", "json_object", "tool_calls")
