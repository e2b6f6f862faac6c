"""POST /v1/completions: text or token-id prompts (one or a list), legacy logprobs, echo, streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from herd.platform.meter import reserve
from herd.server.logprobs import legacy_logprobs, merge_legacy
from herd.server.protocol import CompletionRequest, make_params, params_from, sampling_overrides
from herd.server.structured import response_constraint
from herd.server.routes.common import SSE_DONE, SSE_HEADERS, parse_body, sse, sse_error, state_of, usage
from herd.server.state import ClientGone, ServerState, Ticket, merge, new_id, until_disconnected

router = APIRouter()


@router.post("/completions")
async def completions(request: Request) -> Response:
    st = state_of(request)
    # More token ids than the context holds can never fit (the prompt-list limit is lower still).
    req = await parse_body(request, CompletionRequest, max_items={"prompt": st.max_prompt_tokens})
    c, ticket = await prepare_completion(st, req)
    if req.stream:
        return StreamingResponse(c.stream(ticket), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        outs = await until_disconnected(request, c.run_all(ticket))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(c.response(outs))


async def prepare_completion(st: ServerState, req: CompletionRequest, *, priority: int = 0,
                             admit: bool = True) -> tuple[_Completion, Ticket | None]:
    """Checks, prompts, sampling parameters, reservation and ticket (see chat.prepare_chat: the
    batch runner shares this path)."""
    st.check_model(req.model)
    overrides = sampling_overrides(req)
    constraint = response_constraint(req)
    if constraint is not None:
        overrides["structured_outputs"] = constraint
    early = params_from(st.engine, overrides)  # one early check of the sampling fields
    prompts = req.prompts()
    if admit:  # before any tokenizing: more sequences than the server ever admits can never run
        st.check_admissible(len(prompts) * early.n, "prompt" if len(prompts) > 1 else "n")
    jobs = []
    for i, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            ids, text = await st.encode_text(prompt, param=param), prompt
        else:
            ids, text = list(prompt), None
        params = make_params(
            params_from(st.engine, overrides),
            overrides,
            prompt_len=len(ids),
            max_model_len=st.max_model_len,
            behavior=req.context_length_exceeded_behavior or "error",
        )
        if priority != params.priority:
            params = dataclasses.replace(params, priority=priority)
        st.check_prompt(ids, params, param)
        jobs.append((ids, params, text))
    await reserve(sum(len(ids) for ids, _, _ in jobs), overrides.get("max_tokens"), n=sum(p.n for _, p, _ in jobs))
    ticket = st.admit(sum(p.n for _, p, _ in jobs), "prompt" if len(jobs) > 1 else "n") if admit else None  # sequences, not prompts
    return _Completion(st, req, jobs, new_id("cmpl"), int(time.time())), ticket


class _Completion:
    def __init__(self, st: ServerState, req: CompletionRequest, jobs, id: str, created: int):
        self.st = st
        self.req = req
        self.jobs = jobs
        self.id = id
        self.created = created
        self.k = jobs[0][1].logprobs
        self.n = jobs[0][1].n

    def _request_id(self, i: int) -> str:
        return self.id if len(self.jobs) == 1 else f"{self.id}-{i}"

    def _streams(self):
        # One ticket admitted all prompts; run_all / stream give it back when all are done.
        return [
            self.st.generate(ids, params, self._request_id(i), None, prompt)
            for i, (ids, params, prompt) in enumerate(self.jobs)
        ]

    async def run_all(self, ticket):
        last: dict[int, object] = {}
        try:
            async for i, out in merge(self._streams()):
                last[i] = out
        finally:
            if ticket is not None:
                ticket.release()
        return [last[i] for i in range(len(self.jobs))]

    def _echo(self, i: int, out) -> tuple[str, dict | None]:
        ids, params, prompt = self.jobs[i]
        text = prompt if prompt is not None else self.st.tokenizer.decode(ids, skip_special_tokens=False)
        lp = None
        if self.k is not None:
            entries = out.prompt_logprobs or [None] * len(ids)
            lp = legacy_logprobs(self.st.token_text, ids, entries, self.k, specials_in_text=prompt is None)
        return text, lp

    def _choice(self, i: int, out, o, *, delta: bool, echo: bool) -> dict:
        text = o.delta_text if delta else o.text
        token_ids = o.delta_token_ids if delta else o.token_ids
        entries = o.delta_logprobs if delta else o.logprobs
        lp = None
        prefix = ""
        if echo:
            prefix, lp = self._echo(i, out)
        if self.k is not None:
            offset = len(prefix) if not delta else 0
            gen = legacy_logprobs(self.st.token_text, token_ids, entries or [], self.k, offset)
            lp = merge_legacy(lp, gen) if lp is not None else gen
        return {
            "index": i * self.n + o.index,
            "text": prefix + text,
            "logprobs": lp,
            "finish_reason": o.finish_reason,
            "stop_reason": o.stop_reason,
            "seed": self.jobs[i][1].seed,
        }

    def _usage(self, outs) -> dict:
        return usage(
            sum(len(o.prompt_token_ids) for o in outs),
            sum(o.num_generated_tokens for o in outs),
            sum(o.num_cached_tokens for o in outs),
        )

    def _body(self, choices, usage_=None, object_="text_completion") -> dict:
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.st.model_name,
            "choices": choices,
            "usage": usage_,
        }

    def response(self, outs) -> dict:
        choices = [
            self._choice(i, out, o, delta=False, echo=bool(self.req.echo))
            for i, out in enumerate(outs)
            for o in out.outputs
        ]
        body = self._body(sorted(choices, key=lambda c: c["index"]), self._usage(outs))
        body["prompt"] = []
        return body

    async def stream(self, ticket):
        finals: dict[int, object] = {}
        echoed: set[tuple[int, int]] = set()
        done: set[tuple[int, int]] = set()
        try:
            async for i, out in merge(self._streams()):
                chunks = []
                for o in out.outputs:
                    key = (i, o.index)
                    if key in done:
                        continue
                    echo = bool(self.req.echo) and key not in echoed
                    has_logprobs = self.k is not None and o.delta_token_ids
                    if not (o.delta_text or o.finished or has_logprobs or echo):
                        continue
                    echoed.add(key)
                    if o.finished:
                        done.add(key)
                    chunks.append(self._choice(i, out, o, delta=True, echo=echo))
                if out.finished:
                    finals[i] = out
                for j, choice in enumerate(chunks):
                    all_done = len(finals) == len(self.jobs) and j == len(chunks) - 1
                    usage_ = self._usage(list(finals.values())) if all_done else None
                    yield sse(self._body([choice], usage_))
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield sse(self._body([], self._usage([finals[i] for i in sorted(finals)])))
            yield SSE_DONE
        except asyncio.CancelledError:
            raise
        except Exception as e:
            yield sse_error(e)
            yield SSE_DONE
        finally:
            ticket.release()
