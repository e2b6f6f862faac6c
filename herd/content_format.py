"""Which form of message `content` a chat template expects: a string, or OpenAI's list of parts.

OpenAI lets `content` be `[{"type": "text", "text": ...}, {"type": "image_url", ...}]`, and many
clients always send it so. Templates written for text models (SmolLM2's, most Llama 3 era ones)
concatenate `message['content']` as a string and fail on a list; multimodal templates (Llama 4's)
loop over the parts. As vLLM's `--chat-template-content-format auto` does, herd reads the
template's syntax tree: a `for` loop over a message's content means parts, anything else a string.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import jinja2
from jinja2 import nodes

ContentFormat = Literal["string", "openai"]


def _is_content(node: nodes.Node) -> bool:
    """`x['content']` or `x.content`."""
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return isinstance(node, nodes.Getattr) and node.attr == "content"


def _mentions_content(expr: nodes.Node, aliases: set[str]) -> bool:
    """Whether an expression reads a message's content (directly, through filters such as
    `| selectattr(...)`, or through a variable set from it)."""
    for node in [expr, *expr.find_all(nodes.Node)]:
        if _is_content(node) or (isinstance(node, nodes.Name) and node.name in aliases):
            return True
    return False


@lru_cache(maxsize=32)
def content_format(source: str, env: jinja2.Environment | None = None) -> ContentFormat:
    """"openai" when the template iterates over a message's content, else "string". `env` is the
    environment the template renders in (its extensions must parse the template's tags)."""
    try:
        tree = (env or jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])).parse(source)
    except jinja2.TemplateSyntaxError:
        return "string"  # rendering will report the error itself
    # Variables assigned from a message's content (`{% set content = message['content'] %}`).
    aliases = {
        target.name
        for assign in tree.find_all(nodes.Assign)
        if _mentions_content(assign.node, set())
        for target in ([assign.target] if isinstance(assign.target, nodes.Name) else [])
    }
    for loop in tree.find_all(nodes.For):
        if _mentions_content(loop.iter, aliases):
            return "openai"
    return "string"


def flatten_text_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages whose list content is joined into one string (text parts, newline-separated), for
    templates that take strings. Image parts cannot be placed in a string: that is an error."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(part.get("text") or "")
                else:
                    raise ValueError(
                        f"this model's chat template takes text content only; a {kind!r} part cannot be placed in it"
                    )
            message = {**message, "content": "\n".join(texts)}
        out.append(message)
    return out
