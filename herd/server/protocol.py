"""Request bodies (OpenAI + Together + vLLM fields) and their translation to SamplingParams.

Unknown fields are ignored, never rejected. Field ranges are checked here so a bad value gets a
400 naming its `param`; whatever SamplingParams still refuses becomes a 400 too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from herd.engine.sampling import SamplingParams
from herd.server.errors import bad_request

MAX_N = 128
MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    context_length_exceeded_behavior: Literal["error", "truncate"] | None = "error"
    # vLLM's extras
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    structured_outputs: dict[str, Any] | None = None  # {json | regex | choice | grammar | json_object}

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 64:
            raise ValueError("at most 64 stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        for key, bias in v.items():
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"keys must be token ids (integers as strings), got {key!r}") from None
            if token < 0:
                raise ValueError(f"token id {key} is negative")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} must be in [-100, 100]")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not -(2**63) <= v < 2**64:
            raise ValueError("seed must fit in 64 bits")
        return v


def _strict_logprobs(v: Any, *, allow_bool: bool) -> Any:
    """`logprobs` is OpenAI's boolean or Together's integer: JSON true must stay a boolean."""
    if v is None or isinstance(v, bool):
        if isinstance(v, bool) and not allow_bool:
            raise ValueError("must be an integer in [0, 20]")
        return v
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        v = int(v)
        if not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"must be in [0, {MAX_LOGPROBS}]")
        return v
    raise ValueError("must be a boolean or an integer in [0, 20]")


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Any = None  # bool (OpenAI) or int 0..20 (Together)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v):
        return _strict_logprobs(v, allow_bool=True)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v is None or v in ("auto", "none", "required"):
            return v
        if isinstance(v, dict) and v.get("type", "function") == "function":
            fn = v.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
                return v
        raise ValueError('must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')

    def num_logprobs(self) -> int | None:
        """Top-k count for generated tokens, or None for no logprobs."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return self.top_logprobs or 0
        return self.logprobs  # Together's integer form


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Any = None  # int 0..20 (legacy OpenAI and Together)
    suffix: str | None = None
    response_format: dict[str, Any] | None = None
    best_of: int | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v):
        # Some clients send true; read it as "the sampled token only".
        v = _strict_logprobs(v, allow_bool=True)
        return 0 if v is True else (None if v is False else v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt list is empty")
            if not isinstance(v[0], int) and len(v) > 1024:
                raise ValueError("at most 1024 prompts per request")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    def num_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


# -- messages ------------------------------------------------------------------------------

_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(messages: list[dict[str, Any]], *, allow_images: bool) -> list[dict[str, Any]]:
    """Validates chat messages with exact `param` names; returns them ready for the template."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(
                f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}", param=f"{where}.role"
            )
        content = m.get("content")
        if content is None:
            if role == "assistant" and (m.get("tool_calls") or i == len(messages) - 1):
                pass
            elif role != "assistant":
                raise bad_request(f"{where}.content is required for role {role}", param=f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]", role, allow_images)
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        if role == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise bad_request(f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id")
        tool_calls = m.get("tool_calls")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise bad_request(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
        message = dict(m)
        if role == "developer":
            message["role"] = "system"  # Llama 4 has no developer role: it is the system prompt
        out.append(message)
    return out


def _check_part(part: Any, where: str, role: str, allow_images: bool) -> None:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object", param=where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text must be a string", param=f"{where}.text")
    elif kind in ("image_url", "image", "input_image"):
        if role != "user":
            raise bad_request(f"{where}: images are only allowed in user messages", param=where)
        if not allow_images:
            raise bad_request(f"{where}: this model does not accept image input; send text parts only", param=where)
        value = part.get("image_url", part.get("image"))
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise bad_request(f"{where}.image_url.url must be a non-empty string", param=f"{where}.image_url.url")
    else:
        raise bad_request(f"{where}.type must be 'text' or 'image_url'; got {kind!r}", param=f"{where}.type")


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") in ("image_url", "image", "input_image")
    )


# -- sampling ------------------------------------------------------------------------------

_PASS_THROUGH = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "n",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "min_tokens",
    "ignore_eos",
    "prompt_logprobs",
)


def sampling_overrides(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The SamplingParams fields the client actually set (the checkpoint's defaults fill the rest)."""
    o: dict[str, Any] = {}
    for name in _PASS_THROUGH:
        value = getattr(req, name)
        if value is not None:
            o[name] = value
    max_tokens = req.max_tokens
    if max_tokens is None and isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens
    if max_tokens is not None:
        o["max_tokens"] = max_tokens
    if req.stop is not None:
        o["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.logit_bias:
        o["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
    k = req.num_logprobs()
    if k is not None:
        o["logprobs"] = k
        if req.echo and "prompt_logprobs" not in o:
            o["prompt_logprobs"] = k
    return o


def make_params(
    defaults: SamplingParams,
    overrides: dict[str, Any],
    *,
    prompt_len: int,
    max_model_len: int,
    behavior: str,
) -> SamplingParams:
    """Builds SamplingParams and applies the context-length policy.

    `defaults` is engine.default_params(**overrides) (already validated); max_tokens is checked
    against the context here: explicit values over the context are an error unless the client
    asked to truncate; the checkpoint's default is capped silently.
    """
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
            f"{prompt_len} tokens: no room to generate.",
            param="messages",
            code="context_length_exceeded",
        )
    params = defaults
    asked = overrides.get("max_tokens")
    if asked is not None and prompt_len + asked > max_model_len:
        if behavior != "truncate":
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                "Reduce the prompt or max_tokens, or set context_length_exceeded_behavior to 'truncate'.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        params.max_tokens = room
    elif params.max_tokens is None or params.max_tokens > room:
        params.max_tokens = room
    return params


def params_from(engine, overrides: dict[str, Any]) -> SamplingParams:
    """engine.default_params with the client's fields; SamplingParams' own refusals become 400s."""
    try:
        return engine.default_params(**overrides)
    except TypeError:  # a field SamplingParams does not know: its message would name our code
        raise bad_request("invalid sampling parameters") from None
    except ValueError as e:
        message = str(e)
        param = message.split(" ", 1)[0]
        raise bad_request(message, param=param if param in SamplingParams.__dataclass_fields__ else None) from None
