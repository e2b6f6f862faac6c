"""herd's tokenizer: a checkpoint's tokenizer.json plus its Jinja chat template.

Only `tokenizers`, `jinja2` and the standard library are used at serving time (no transformers).
The chat template always comes from the checkpoint (or the caller); herd never hard-wires a
prompt format. Rendering follows transformers' chat-template environment so that prompts match
what the model was trained / evaluated with through HF.
"""

from __future__ import annotations

import codecs
import copy
import json
import re
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from herd.content_format import content_format, flatten_text_parts

# Inserted after the first character of every special-token string found in user-supplied
# message content, so that the rendered prompt no longer contains that special-token string
# there; removed again before the text is encoded. U+FDD0 is a Unicode noncharacter: it never
# appears in real text, so we also delete it from user input to keep it unforgeable.
_MARK = "\ufdd0"

# transformers' trick for continue_final_message: tag the last message, render, cut at the tag.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

# OpenAI-style image parts. The HF multimodal templates (Llama 4's included) test for
# `type == 'image'`, so these are presented to the template as image parts.
_IMAGE_PART_TYPES = ("image_url", "input_image", "image")


class PromptTooLong(ValueError):
    """A text has more tokens than the caller allows: `tokens` of them, or at least that many
    when not `exact` (it was refused before being tokenized in full)."""

    def __init__(self, tokens: int, limit: int, exact: bool):
        super().__init__(f"the text has {'' if exact else 'at least '}{tokens} tokens; at most {limit} are allowed")
        self.tokens = tokens
        self.limit = limit
        self.exact = exact


# encode(offload=...) sends texts longer than this to the other process; shorter ones take a few
# milliseconds of GIL here, less than the trip there and back.
OFFLOAD_CHARS = 8192


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special ids and chat-template rendering."""

    def __init__(
        self,
        tokenizer_json: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ):
        self._tok = _HFTokenizer.from_str(tokenizer_json)
        self.tokenizer_json = tokenizer_json  # the grammar library builds its own view from it
        # A second instance with special-token matching switched off, for text that must stay
        # text. `encode_special_tokens` is a setting on the object, so toggling it on one shared
        # instance would not be thread-safe; two instances are simpler.
        self._tok_plain = _HFTokenizer.from_str(tokenizer_json)
        self._tok_plain.encode_special_tokens = True

        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        eos = set(int(i) for i in extra_eos_ids)
        if eos_token and self.token_to_id(eos_token) is not None:
            eos.add(self.token_to_id(eos_token))
        self.eos_token_ids: list[int] = sorted(eos)
        self.chat_template = chat_template

        # Control tokens: the added tokens flagged special. The regex tries longer strings first,
        # so a token whose text contains another token's text is matched whole.
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        specials = sorted((added[i].content for i in self._special_ids), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja, and the stop ids
        from generation_config.json / config.json) from an HF-style checkpoint directory."""
        d = Path(model_dir)
        tok_json = (d / "tokenizer.json").read_text(encoding="utf-8")
        cfg = _read_json(d / "tokenizer_config.json")

        template = cfg.get("chat_template")
        if isinstance(template, list):  # older HF format: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        # Like transformers, a chat_template.jinja file takes precedence over the config entry.
        if (d / "chat_template.jinja").is_file():
            with open(d / "chat_template.jinja", encoding="utf-8", newline="") as f:
                template = f.read()

        # The model stops on any of these: generation_config.json is what HF generate() uses,
        # config.json (or its text_config, for multimodal models) is the fallback.
        eos_ids: list[int] = []
        gen = _read_json(d / "generation_config.json")
        model_cfg = _read_json(d / "config.json")
        for source in (gen, model_cfg, model_cfg.get("text_config") or {}):
            eos_ids += _as_int_list(source.get("eos_token_id"))

        return cls(
            tok_json,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            chat_template=template,
            extra_eos_ids=eos_ids,
        )

    # ------------------------------------------------------ encode / decode

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = False,
        add_bos: bool = False,
        parse_special: bool = True,
        max_tokens: int | None = None,
        offload=None,
    ) -> list[int]:
        """Token ids of `text`. With parse_special, special-token strings in the text become
        their control tokens (as HF tokenizers do); without, the text is encoded as pure text.

        add_special_tokens follows the tokenizer's own rule (its post-processor: Llama 4's puts
        <|begin_of_text|> in front, SmolLM2's adds nothing), except that a text already starting
        with the BOS token gets no second one. add_bos forces a BOS in front (never doubled).

        A text with more than `max_tokens` tokens raises PromptTooLong, without being tokenized
        when its length alone proves it. `offload` (a herd.tokenizer_process.TokenizerProcess)
        tokenizes long texts in another process, so this call does not hold the GIL for them."""
        self.check_length(len(text), max_tokens)
        if offload is not None and len(text) > OFFLOAD_CHARS:
            return offload.encode(
                text, max_tokens=max_tokens, add_special_tokens=add_special_tokens, add_bos=add_bos,
                parse_special=parse_special,
            )
        tok = self._tok if parse_special else self._tok_plain
        ids = tok.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if bos is not None and ids[:2] == [bos, bos] and add_special_tokens:
            # The text began with BOS itself and the post-processor added another: keep one.
            if tok.encode(text, add_special_tokens=False).ids[:1] == [bos]:
                ids = ids[1:]
        if add_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(len(ids), max_tokens, exact=True)
        return ids

    @cached_property
    def max_token_chars(self) -> int | None:
        """The longest token's text, in characters: a text of n characters has at least
        n / max_token_chars tokens. None when a normalizer could shorten the text first."""
        if self._tok.normalizer is not None:
            return None
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=None)

    def check_length(self, chars: int, max_tokens: int | None) -> None:
        """Refuses, without tokenizing it, a text of `chars` characters that must have more than
        `max_tokens` tokens (each token covers at most max_token_chars characters)."""
        if max_tokens is None or not self.max_token_chars:
            return
        at_least = -(-chars // self.max_token_chars)
        if at_least > max_tokens:
            raise PromptTooLong(at_least, max_tokens, exact=False)

    def to_json(self) -> str:
        """The tokenizer.json this tokenizer was made from (to make a copy in another process)."""
        return self._tok.to_str()

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, s) -> int | None:
        return self._tok.token_to_id(s)

    def id_to_token(self, i) -> str | None:
        return self._tok.id_to_token(i)

    def is_special(self, token_id) -> bool:
        return token_id in self._special_ids

    # ---------------------------------------------------------- chat template

    def render_chat(
        self,
        messages,
        *,
        tools=None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template: str | None = None,
        **template_kwargs,
    ) -> str:
        """The prompt text the chat template produces (for display, or to compare with HF).

        Note: special-token strings typed by users appear verbatim here; to get ids that keep
        them as text, use apply_chat_template, not encode(render_chat(...))."""
        return self._render(
            messages, tools, add_generation_prompt, continue_final_message, template, template_kwargs, mark=False
        )

    def apply_chat_template(
        self,
        messages,
        *,
        tools=None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template: str | None = None,
        max_tokens: int | None = None,
        offload=None,
        **template_kwargs,
    ) -> list[int]:
        """Prompt token ids for a conversation. Special tokens written by the template are
        control tokens; special-token strings inside user-supplied content are encoded as text.
        `max_tokens` and `offload` are as for encode()."""
        text = self._render(
            messages, tools, add_generation_prompt, continue_final_message, template, template_kwargs, mark=True
        )
        self.check_length(len(text) - text.count(_MARK), max_tokens)
        if self._special_re is None:
            return self.encode(text.replace(_MARK, ""), parse_special=False, max_tokens=max_tokens, offload=offload)
        # Split at the real special-token strings (only the template's own survive unbroken),
        # encode those as their ids and everything between as plain text, markers removed.
        ids: list[int] = []

        def add_text(piece: str) -> None:
            room = None if max_tokens is None else max_tokens - len(ids)
            try:
                ids.extend(self.encode(piece.replace(_MARK, ""), parse_special=False, max_tokens=room, offload=offload))
            except PromptTooLong as e:  # count the whole prompt, not just this piece
                raise PromptTooLong(len(ids) + e.tokens, max_tokens, exact=False) from None

        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                add_text(text[pos : m.start()])
            ids.append(self.token_to_id(m.group()))
            pos = m.end()
        if pos < len(text):
            add_text(text[pos:])
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(len(ids), max_tokens, exact=True)
        return ids

    def _render(self, messages, tools, add_generation_prompt, continue_final_message, template, kwargs, mark):
        source = template if template is not None else self.chat_template
        if source is None:
            raise ValueError("this tokenizer has no chat template; pass template=")
        messages = _prepare_messages(messages)
        if content_format(source, _environment()) == "string":  # a text model's template: parts joined into a string
            messages = flatten_text_parts(messages)
        tools = copy.deepcopy(tools) if tools is not None else None
        if mark:
            messages = self._mark_specials(messages)
            tools = self._mark_specials(tools)
            kwargs = self._mark_specials(kwargs)

        final_text = None
        if continue_final_message:
            # As transformers does: no generation prompt, tag the end of the final message's
            # (last text) content, render, and cut right before the tag, so the model continues.
            add_generation_prompt = False
            if not messages:
                raise ValueError("continue_final_message needs at least one message")
            final_text = _tag_final_message(messages[-1])

        variables = {}
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, name) is not None:
                variables[name] = getattr(self, name)
        variables.update(kwargs)
        variables.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
        rendered = _compile(source).render(**variables)

        if final_text is not None:
            tag = _CONTINUE_TAG.strip()
            if tag not in rendered or final_text.strip() not in rendered:
                raise ValueError("continue_final_message: the template dropped or altered the final message")
            at = rendered.rindex(tag)
            if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                rendered = rendered[:at]
            else:  # the template trimmed the message's trailing space, so trim ours too
                rendered = rendered[:at].rstrip()
        return rendered

    def _mark_specials(self, obj):
        """Break every special-token string inside user data (strings, recursively; dict keys
        are left alone) by inserting _MARK after its first character."""
        if isinstance(obj, str):
            obj = obj.replace(_MARK, "")
            if self._special_re is None:
                return obj
            return self._special_re.sub(lambda m: m.group()[0] + _MARK + m.group()[1:], obj)
        if isinstance(obj, dict):
            return {k: self._mark_specials(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self._mark_specials(v) for v in obj]
        return obj


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Each step decodes only a small window: the tokens already emitted in the previous step
    (as context, so decoders that look at neighbours behave) plus the not-yet-emitted ones.
    While that window ends in U+FFFD, a multi-byte character is still incomplete, so we wait.
    A UTF-8 character is at most 4 bytes, so after a few pending tokens the bytes must be
    truly invalid, and we emit them (as U+FFFD) rather than letting the window grow.
    """

    _MAX_PENDING = 6
    _PROMPT_CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, prompt_ids: list[int] | None = None):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # ids[_start:_read] were emitted last step (context); ids[_read:] are pending.
        self._ids: list[int] = list(prompt_ids[-self._PROMPT_CONTEXT :]) if prompt_ids else []
        self._start = 0
        self._read = len(self._ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._step(final=False)

    def flush(self) -> str:
        """Emit whatever is pending; an incomplete UTF-8 sequence becomes U+FFFD."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        window = self._ids[self._start :]
        prefix = self._tok.decode(self._ids[self._start : self._read], skip_special_tokens=self._skip)
        full = self._tok.decode(window, skip_special_tokens=self._skip)
        pending = len(self._ids) - self._read
        if full.endswith("\ufffd") and not final and pending < self._MAX_PENDING:
            return ""  # wait: the last character is (probably) not complete yet
        new = full[len(prefix) :]
        # Slide the window: what we just emitted becomes the next step's context.
        self._start, self._read = self._read, len(self._ids)
        # The emitted ids are never needed again: drop them so memory stays bounded.
        if self._start > 0:
            del self._ids[: self._start]
            self._read -= self._start
            self._start = 0
        self.text += new
        return new


# ------------------------------------------------------------------ helpers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_str(value) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_int_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _prepare_messages(messages) -> list[dict]:
    """OpenAI-style messages -> the plain dicts HF chat templates expect (always a copy)."""
    out = []
    for message in messages:
        if hasattr(message, "model_dump"):  # pydantic request objects
            message = message.model_dump()
        # Like transformers: drop keys whose value is None (OpenAI sends content=None with
        # tool_calls); templates handle a missing key but often render None as "None".
        m = {k: copy.deepcopy(v) for k, v in dict(message).items() if v is not None}
        if m.get("role") == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
        if isinstance(m.get("content"), list):
            m["content"] = [_prepare_part(p) for p in m["content"]]
        if m.get("tool_calls"):
            m["tool_calls"] = [_prepare_tool_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _prepare_part(part):
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if isinstance(part, dict) and part.get("type") in _IMAGE_PART_TYPES:
        return {**part, "type": "image"}
    return part


def _prepare_tool_call(call):
    # In OpenAI requests `arguments` is a JSON string; templates expect a mapping (they
    # re-serialise it with tojson), so parse it. Unparseable arguments are passed unchanged.
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass
    return call


def _tag_final_message(message: dict) -> str:
    """Append _CONTINUE_TAG to the final message's (last text) content; return that text."""
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
    raise ValueError("continue_final_message: the final message has no text content to continue")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and just
    render its body; herd does not need assistant masks."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in tojson escapes <, >, & and ' for HTML and sorts keys; chat templates
    # want plain json.dumps (as transformers provides), with these options exposed.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates ship with checkpoints and are untrusted code: render them sandboxed. The
    # whitespace settings and extra globals are those of transformers' chat-template
    # environment, which the templates are written against.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)
