"""Tool calls out of Llama 4's replies, as OpenAI `tool_calls`.

Llama 4 calls tools in one of these forms (a reply may be wrapped in `<|python_start|>` ...
`<|python_end|>`, and may hold several calls):

- JSON, the HF template's `{"name": "f", "parameters": {...}}` or Meta's
  `{"type": "function", "name": "f", "parameters": {...}}` (`arguments` is read as `parameters`,
  and OpenAI's nested `{"type": "function", "function": {"name", "arguments"}}` is read too);
  several calls as a JSON list or one after another, separated by whitespace, `;` or `,`.
- "pythonic": `[f(a=1), g(b="x")]` (a bare `f(a=1)` only inside the python tags), read with `ast`
  (never evaluated):
  keyword arguments whose values are literals (strings, numbers, booleans, None, and lists, tuples
  and dicts of those; JSON's true/false/null are accepted too).

A reply is a tool call only when the whole of it (after leading text that ends at
`<|python_start|>`, if any) is calls, and every call names one of the request's tools; anything
else (text that merely contains braces, a call to an unknown function, a malformed call) stays
ordinary text.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_names(tools: Iterable[Any] | None) -> set[str]:
    """The function names a request offers: OpenAI's `{type:function, function:{name}}` (or a bare
    `{name}`)."""
    names = set()
    for t in tools or ():
        if not isinstance(t, dict):
            continue
        fn = t.get("function") if isinstance(t.get("function"), dict) else t
        if isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


# -- parsing ---------------------------------------------------------------------------------


def parse_tool_calls(text: str, names: Iterable[str]) -> list[ToolCall] | None:
    """The calls that make up all of `text` (python tags allowed), or None when it is not calls."""
    body = text.replace(PYTHON_START, "").replace(PYTHON_END, "").strip()
    if not body:
        return None
    names = set(names)
    calls = _parse_json(body) if body[0] in "[{" else None
    if calls is None:
        calls = _parse_pythonic(body)
    if not calls or any(c.name not in names for c in calls):
        return None
    return calls


def split_reply(text: str, names: Iterable[str]) -> tuple[str, list[ToolCall] | None]:
    """(content, calls) for a finished reply: a reply that is calls gives ("", calls); text then
    `<|python_start|>` then calls gives (that text, calls); anything else gives (text, None)."""
    names = set(names)
    if not names:
        return text, None
    if could_start_call(text.lstrip()):
        calls = parse_tool_calls(text, names)
        if calls:
            return "", calls
    at = text.find(PYTHON_START)
    if at > 0:
        calls = parse_tool_calls(text[at:], names)
        if calls:
            return text[:at], calls
    return text, None


def _parse_json(body: str) -> list[ToolCall] | None:
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    values: list[Any] = []
    pos = 0
    while pos < len(body):
        try:
            value, end = decoder.raw_decode(body, pos)
        except (json.JSONDecodeError, RecursionError):
            return None
        values.extend(value if isinstance(value, list) else [value])
        pos = end
        while pos < len(body) and (body[pos].isspace() or body[pos] in ";,"):
            pos += 1
    calls = []
    for v in values:
        call = _json_call(v)
        if call is None:
            return None
        calls.append(call)
    return calls


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _json_call(v: Any) -> ToolCall | None:
    if not isinstance(v, dict):
        return None
    if isinstance(v.get("function"), dict) and "name" not in v:  # OpenAI's nested shape
        v = v["function"]
    if "type" in v and v["type"] != "function":
        return None
    name = v.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = v.get("parameters", v.get("arguments", {}))
    if isinstance(args, str):  # arguments already as a JSON string
        try:
            args = json.loads(args, parse_constant=_no_constant) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    if set(v) - {"type", "name", "parameters", "arguments"}:
        return None  # some other JSON object that happens to have a "name"
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _parse_pythonic(body: str) -> list[ToolCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    nodes = tree.elts if isinstance(tree, ast.List) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None  # positional arguments cannot be matched to parameter names
        name = _dotted_name(node.func)
        if name is None:
            return None
        args = {}
        for kw in node.keywords:
            if kw.arg is None:  # **kwargs
                return None
            try:
                args[kw.arg] = _literal(kw.value)
            except ValueError:
                return None
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    return calls or None


def _dotted_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted_name(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


_NAMED_LITERALS = {"true": True, "false": False, "null": None, "none": None, "True": True, "False": False, "None": None}


def _literal(node: ast.AST) -> Any:
    """A JSON value from a literal expression node; ValueError for anything else."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (str, int, float, bool)) or node.value is None:
            if isinstance(node.value, float) and not math.isfinite(node.value):
                raise ValueError("not a JSON number")
            return node.value
        raise ValueError("unsupported constant")
    if isinstance(node, ast.Name) and node.id in _NAMED_LITERALS:
        return _NAMED_LITERALS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise ValueError("** in a dict")
            key = _literal(k)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ValueError("unsupported key")
            out[key if isinstance(key, str) else json.dumps(key)] = _literal(v)
        return out
    raise ValueError(f"not a literal: {type(node).__name__}")


# -- streaming -------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][\w.]*")


def could_start_call(text: str) -> bool:
    """Whether `text` (leading whitespace already removed) may still grow into a tool call."""
    if not text:
        return True
    if PYTHON_START.startswith(text) or text.startswith(PYTHON_START):
        return True
    if text[0] == "{":
        return _json_object_start(text[1:])
    if text[0] == "[":
        rest = text[1:].lstrip()
        if not rest:
            return True
        if rest[0] == "{":
            return _json_object_start(rest[1:])
        return _call_start(rest)
    return False


def _json_object_start(rest: str) -> bool:
    """After `{`: the first key must be one a call object can start with."""
    rest = rest.lstrip()
    if not rest:
        return True
    if rest[0] != '"':
        return False
    key = rest[1:]
    end = key.find('"')
    if end < 0:
        return any(k.startswith(key) for k in ("name", "type", "function", "parameters", "arguments"))
    return key[:end] in ("name", "type", "function", "parameters", "arguments")


def _call_start(rest: str) -> bool:
    """Inside `[`: an identifier, then `(` once the identifier ends."""
    m = _IDENT.match(rest)
    if m is None:
        return False
    after = rest[m.end() :].lstrip()
    return not after or after[0] == "("


class ToolCallStream:
    """Splits one streamed reply into content to send now and text held back as a possible call.

    feed() takes each new piece of text and returns the content that can be sent at once; while the
    reply could still be a tool call (it starts with `{`, `[` or `<|python_start|>`, or has reached
    `<|python_start|>` after some text) nothing more is sent. finish() returns the remaining
    content and the calls, if the held text turned out to be calls.
    """

    def __init__(self, names: Iterable[str], clean: Callable[[str], str] = lambda s: s):
        self.names = set(names)
        self.clean = clean  # applied to content on its way out (e.g. to drop special tokens)
        self.text = ""
        self.sent = 0  # text[:sent] has been sent as content
        self.state = "start"  # "start" (only whitespace so far) | "content" | "holding"

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.state == "holding":
            held = self.text[self.sent :]
            if held.startswith(PYTHON_START) or could_start_call(held.lstrip()):
                return ""
            self.state = "content"  # it can no longer be a call: send it as content
        elif self.state == "start":
            stripped = self.text[self.sent :].lstrip()
            if not stripped:
                return ""
            if could_start_call(stripped):
                self.state = "holding"
                return ""
            self.state = "content"
        pending = self.text[self.sent :]
        at = pending.find(PYTHON_START)
        if at >= 0:  # text, then a tagged call: hold from the tag to the end
            self.sent += at
            self.state = "holding"
            return self.clean(pending[:at])
        keep = _partial_suffix(pending)
        out = pending[: len(pending) - keep]
        self.sent += len(out)
        return self.clean(out)

    def finish(self) -> tuple[str, list[ToolCall] | None]:
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        if self.state == "holding":
            calls = parse_tool_calls(rest, self.names)
            if calls:
                return "", calls
        return self.clean(rest), None


def _partial_suffix(text: str) -> int:
    """How many trailing characters could be the start of a special token (held for one more step)."""
    at = text.rfind("<|")
    if at >= 0 and "|>" not in text[at:] and len(text) - at < 64:
        return len(text) - at
    if text.endswith("<"):
        return 1
    return 0


def special_token_remover(tokenizer) -> Callable[[str], str]:
    """Drops the tokenizer's special-token strings from text (what skip_special_tokens would have
    done), for replies decoded with them kept so that `<|python_start|>` could be seen. Built once
    per tokenizer (about 50 ms for Llama 4's 202K-token vocabulary), then cached."""
    cached = _REMOVERS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    specials = {tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)}
    specials.discard(None)
    specials.discard("")
    if specials:
        pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
        firsts = frozenset(t[0] for t in specials)
        remover = lambda s: pattern.sub("", s) if any(c in firsts for c in s) else s  # noqa: E731
    else:
        remover = lambda s: s  # noqa: E731
    _REMOVERS[id(tokenizer)] = (tokenizer, remover)
    return remover


_REMOVERS: dict[int, tuple[Any, Callable[[str], str]]] = {}
