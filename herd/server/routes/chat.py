"""POST /v1/chat/completions: one JSON body, or SSE chunks as the OpenAI and Together SDKs read them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from herd.platform.meter import reserve
from herd.server.errors import bad_request
from herd.server.logprobs import chat_logprobs, legacy_logprobs
from herd.server.protocol import (
    ChatCompletionRequest,
    check_messages,
    count_images,
    make_params,
    params_from,
    sampling_overrides,
)
from herd.server.routes.common import SSE_DONE, SSE_HEADERS, parse_body, sse, sse_error, state_of, usage
from herd.server.state import ClientGone, ServerState, Ticket, new_id, until_disconnected
from herd.server.structured import response_constraint, tool_call_constraint
from herd.server.tool_calls import ToolCallStream, special_token_remover, split_reply, tool_names

router = APIRouter()


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    st = state_of(request)
    # Each message takes at least one token of the context: more can never fit.
    req = await parse_body(request, ChatCompletionRequest, max_items={"messages": st.max_prompt_tokens})
    chat, ticket = await prepare_chat(st, req)
    if req.stream:
        return StreamingResponse(chat.stream(ticket), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        out = await until_disconnected(request, chat.final_output(ticket))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(chat.response(out))


async def prepare_chat(st: ServerState, req: ChatCompletionRequest, *, priority: int = 0,
                       admit: bool = True) -> tuple[_Chat, Ticket | None]:
    """Everything between the parsed body and the engine: checks, the prompt, the sampling
    parameters, the token reservation and the admission ticket. The batch runner calls this
    too (at a worse priority, admitted by its own cap), so a batch line's body is the body the
    same request gets online."""
    st.check_model(req.model)
    if len(req.messages) > 256:  # a long conversation takes a while to check: not on the event loop
        messages = await asyncio.to_thread(check_messages, req.messages, allow_images=st.accepts_images)
    else:
        messages = check_messages(req.messages, allow_images=st.accepts_images)
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs a final assistant message", param="messages")
    overrides = sampling_overrides(req)
    names = _tool_call_names(req)
    constraint = tool_call_constraint(req, names) or response_constraint(req)
    if constraint is not None:
        overrides["structured_outputs"] = constraint
    clean = None
    if names and req.skip_special_tokens is None:
        # Keep <|python_start|> in the text so a call after some prose is found; the special
        # tokens are dropped from whatever is sent as content, as skip_special_tokens would.
        overrides["skip_special_tokens"] = False
        clean = special_token_remover(st.tokenizer)
    defaults = params_from(st.engine, overrides)
    if admit:  # before any tokenizing: such a request can never run
        st.check_admissible(defaults.n, "n")
    chat_prompt = await st.encode_chat(
        messages,
        tools=req.tools,
        add_generation_prompt=bool(req.add_generation_prompt),
        continue_final_message=bool(req.continue_final_message),
        chat_template_kwargs=req.chat_template_kwargs,
    )
    prompt_ids, images = chat_prompt.prompt_ids, chat_prompt.images
    params = make_params(
        defaults,
        overrides,
        prompt_len=len(prompt_ids),
        max_model_len=st.max_model_len,
        behavior=req.context_length_exceeded_behavior or "error",
    )
    if priority != params.priority:
        params = dataclasses.replace(params, priority=priority)
    st.check_prompt(prompt_ids, params, "messages")
    await reserve(len(prompt_ids), overrides.get("max_tokens"), n=params.n, images=count_images(messages))  # 429 over TPM
    ticket = st.admit(params.n, "n") if admit else None  # each of the n samples is a sequence in the engine
    chat = _Chat(st, req, params, prompt_ids, new_id("chatcmpl"), int(time.time()), images, names, clean)
    return chat, ticket


def _tool_call_names(req: ChatCompletionRequest) -> set[str]:
    """The function names whose calls are parsed out of the reply (none: the reply is all text).

    "auto" lets the model choose (a reply that is not a valid call comes back as text);
    "required" and a named function are enforced by a grammar (herd.server.structured).
    """
    choice = req.tool_choice
    if choice not in (None, "auto", "none") and not req.tools:
        raise bad_request("tool_choice other than 'auto' or 'none' needs `tools`", param="tool_choice")
    if not req.tools or choice == "none":
        return set()
    names = tool_names(req.tools)
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        raise bad_request(
            f"tool_choice names the function {choice['function']['name']!r}, which is not among the tools",
            param="tool_choice",
        )
    return names


class _Chat:
    """Builds the response body or the chunks of one chat completion."""

    def __init__(self, st: ServerState, req: ChatCompletionRequest, params, prompt_ids, id: str, created: int,
                 images=None, tool_names: set[str] | None = None, clean=None):
        self.st = st
        self.names = tool_names or set()
        self.clean = clean or (lambda s: s)
        self.tool_streams: dict[int, ToolCallStream] = {}
        self.held_logprobs: dict[int, tuple[list, list]] = {}
        self.images = images
        self.req = req
        self.params = params
        self.prompt_ids = prompt_ids
        self.id = id
        self.created = created
        self.k = params.logprobs

    async def final_output(self, ticket: Ticket | None):
        return await self.st.final_output(self.prompt_ids, self.params, self.id, ticket, images=self.images)

    def _logprobs(self, token_ids, entries) -> dict | None:
        if self.k is None:
            return None
        return chat_logprobs(self.st.token_text, token_ids, entries or [], self.k)

    def _usage(self, out) -> dict:
        return usage(len(out.prompt_token_ids), out.num_generated_tokens, out.num_cached_tokens)

    def _prompt_field(self, out) -> list:
        """Together's `prompt` (with `echo`): the prompt text, and its logprobs when asked."""
        if not self.req.echo:
            return []
        text = self.st.tokenizer.decode(self.prompt_ids, skip_special_tokens=False)
        item: dict[str, Any] = {"text": text, "logprobs": None}
        if out is not None and out.prompt_logprobs is not None and self.k is not None:
            item["logprobs"] = legacy_logprobs(self.st.token_text, self.prompt_ids, out.prompt_logprobs, self.k)
        return [item]

    def _vllm_prompt_logprobs(self, out):
        if self.req.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        text = self.st.token_text.text
        return [
            None if e is None else {str(t): {"logprob": lp, "decoded_token": text(t)} for t, lp in e.items()}
            for e in out.prompt_logprobs
        ]

    def response(self, out) -> dict:
        choices = []
        for o in out.outputs:
            content, calls, finish_reason = o.text, None, o.finish_reason
            if self.names:
                content, calls = split_reply(o.text, self.names)
                content = self.clean(content)
                if calls:
                    content = content if content.strip() else None
                    finish_reason = "tool_calls"
            choices.append(
                {
                    "index": o.index,
                    "seed": self.params.seed,
                    "finish_reason": finish_reason,
                    "stop_reason": o.stop_reason,
                    "logprobs": self._logprobs(o.token_ids, o.logprobs),
                    # No tool_calls key without calls: OpenAI leaves it out, and clients test for it.
                    "message": {"role": "assistant", "content": content}
                    | ({"tool_calls": [c.to_openai() for c in calls]} if calls else {}),
                }
            )
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.st.model_name,
            "prompt": self._prompt_field(out),
            "choices": choices,
            "usage": self._usage(out),
            "system_fingerprint": None,
        }
        prompt_logprobs = self._vllm_prompt_logprobs(out)
        if prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs
        return body

    def _chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        return sse(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.st.model_name,
                "system_fingerprint": None,
                "choices": choices,
                "usage": usage_,
            }
        )

    def _tool_choices(self, o) -> list[dict]:
        """Chunks for one streamed choice of a request with tools: text that could still become a
        tool call is held back; at the end it is sent as tool_calls deltas or as content."""
        ts = self.tool_streams.get(o.index)
        if ts is None:
            ts = self.tool_streams[o.index] = ToolCallStream(self.names, self.clean)
        ids, entries = self.held_logprobs.setdefault(o.index, ([], []))
        if self.k is not None:
            ids += o.delta_token_ids
            entries += o.delta_logprobs or []

        def take_logprobs():
            if self.k is None or not ids:
                return None
            lp = self._logprobs(list(ids), list(entries))
            ids.clear()
            entries.clear()
            return lp

        def choice(delta, finish_reason=None, stop_reason=None):
            return {"index": o.index, "delta": delta, "logprobs": take_logprobs(), "finish_reason": finish_reason,
                    "stop_reason": stop_reason}

        chunks = []
        text = ts.feed(o.delta_text)
        if text:
            chunks.append(choice({"content": text}))
        if not o.finished:
            return chunks
        rest, calls = ts.finish()
        if rest:
            chunks.append(choice({"content": rest}))
        for i, call in enumerate(calls or ()):
            head = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            chunks.append(choice({"tool_calls": [head]}))
            chunks.append(choice({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}))
        chunks.append(choice({}, "tool_calls" if calls else o.finish_reason, o.stop_reason))
        return chunks

    async def stream(self, ticket):
        st = self.st
        finished: set[int] = set()
        try:
            # The role goes in the first chunk of each choice only.
            for i in range(self.params.n):
                yield self._chunk(
                    [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
                )
            async for out in st.generate(self.prompt_ids, self.params, self.id, ticket, images=self.images):
                pending = []
                for o in out.outputs:
                    if o.index in finished:
                        continue
                    if self.names:
                        pending += self._tool_choices(o)
                        if o.finished:
                            finished.add(o.index)
                        continue
                    has_logprobs = self.k is not None and o.delta_token_ids
                    if not (o.delta_text or o.finished or has_logprobs):
                        continue
                    pending.append(
                        {
                            "index": o.index,
                            "delta": {"content": o.delta_text} if o.delta_text or not o.finished else {},
                            "logprobs": self._logprobs(o.delta_token_ids, o.delta_logprobs) if has_logprobs else None,
                            "finish_reason": o.finish_reason,
                            "stop_reason": o.stop_reason if o.finished else None,
                        }
                    )
                    if o.finished:
                        finished.add(o.index)
                for j, choice in enumerate(pending):
                    last = out.finished and j == len(pending) - 1
                    yield self._chunk([choice], self._usage(out) if last else None)
                if out.finished:
                    if self.req.stream_options and self.req.stream_options.include_usage:
                        yield self._chunk([], self._usage(out))
            yield SSE_DONE
        except asyncio.CancelledError:
            raise
        except Exception as e:
            yield sse_error(e)
            yield SSE_DONE
        finally:
            ticket.release()
