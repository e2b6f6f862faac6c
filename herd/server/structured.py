"""Request fields that constrain the output, as the engine's StructuredOutputsParams:
`response_format` (OpenAI's json_object / json_schema, Together's json_object with `schema`),
vLLM's `structured_outputs`, and a forced `tool_choice`. Each is checked here, so a bad schema,
regex or grammar is a 400 naming its field before anything is queued.
"""

from __future__ import annotations

from typing import Any

from herd.server.errors import bad_request
from herd.structured.grammars import validate
from herd.structured.spec import StructuredOutputsParams


def response_constraint(req) -> StructuredOutputsParams | None:
    """From `structured_outputs` (vLLM) or `response_format` (OpenAI, Together)."""
    raw = getattr(req, "structured_outputs", None)
    fmt = getattr(req, "response_format", None)
    if raw is not None:
        if fmt is not None and fmt.get("type", "text") != "text":
            raise bad_request("send response_format or structured_outputs, not both", param="structured_outputs")
        try:
            spec = StructuredOutputsParams.coerce(raw)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), param="structured_outputs") from None
        return _checked(spec, "structured_outputs")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = fmt.get("schema")  # Together's form carries a schema, and it is enforced
        if schema is None:
            return _checked(StructuredOutputsParams(json_object=True), "response_format")
        if not isinstance(schema, (dict, str)):
            raise bad_request("response_format.schema must be a JSON schema object", param="response_format.schema")
        return _checked(StructuredOutputsParams(json=schema), "response_format.schema")
    if kind == "json_schema":
        body = fmt.get("json_schema")
        if not isinstance(body, dict):
            raise bad_request("response_format.json_schema must be an object with a schema", param="response_format.json_schema")
        schema = body.get("schema", body.get("json_schema"))
        if schema is None:
            return _checked(StructuredOutputsParams(json_object=True), "response_format.json_schema")
        if not isinstance(schema, (dict, str)):
            raise bad_request("response_format.json_schema.schema must be an object", param="response_format.json_schema.schema")
        return _checked(StructuredOutputsParams(json=schema), "response_format.json_schema.schema")
    raise bad_request(
        f"response_format.type must be 'text', 'json_object' or 'json_schema'; got {kind!r}", param="response_format.type"
    )


def tool_call_constraint(req, names: set[str]) -> StructuredOutputsParams | None:
    """A forced `tool_choice` ("required" or a named function) as a grammar of calls in the JSON
    form Llama 4's chat template teaches; `parallel_tool_calls: false` allows exactly one call.
    With "auto" and a tool marked `strict: true`, the reply stays free unless it starts a call,
    which must then be valid (the arguments of strict tools follow their schema)."""
    choice = req.tool_choice
    if not req.tools or choice == "none":
        return None
    auto = choice in (None, "auto")
    if auto and not any(_strict(t) for t in req.tools):
        return None  # free: the model decides, and a reply that is not a call stays text
    wanted = {choice["function"]["name"]} if isinstance(choice, dict) else names
    functions = []
    for tool in req.tools:
        fn = _function(tool)
        if fn is not None and fn["name"] in wanted and fn["name"] not in {f["name"] for f in functions}:
            if auto and not _strict(tool):
                fn["parameters"] = {"type": "object"}  # only strict tools get their arguments checked
            functions.append(fn)
    if not functions:
        raise bad_request("tool_choice needs at least one function in `tools`", param="tools")
    parallel = getattr(req, "parallel_tool_calls", None) is not False
    spec = {"functions": functions, "parallel": parallel, "auto": auto}
    return _checked(StructuredOutputsParams(tool_calls=spec), "tools")


def _strict(tool: Any) -> bool:
    return isinstance(tool, dict) and isinstance(tool.get("function"), dict) and tool["function"].get("strict") is True


def _function(tool: Any) -> dict | None:
    if not isinstance(tool, dict):
        return None
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = fn.get("name")
    if not isinstance(name, str):
        return None
    parameters = fn.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"the parameters of tool {name!r} must be a JSON schema object", param="tools")
    return {"name": name, "parameters": parameters or {"type": "object"}}


def _checked(spec: StructuredOutputsParams, param: str) -> StructuredOutputsParams:
    try:
        validate(spec)
    except ValueError as e:
        raise bad_request(str(e), param=param) from None
    return spec
