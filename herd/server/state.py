"""What every route shares: the engine, the server's options, admission control, metrics, and the
one helper that runs an engine request for an HTTP request (so all routes abort, count and fail
the same way)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jinja2
from starlette.requests import Request

from herd.chat_prompt import ChatPrompt, ImageLimitError, ImageOptions, build_chat_prompt
from herd.engine.sampling import SamplingParams
from herd.image_fetch import FetchError
from herd.multimodal import ImageError
from herd.platform.meter import observe
from herd.server.errors import APIError, bad_request, model_not_found
from herd.server.logprobs import TokenText
from herd.server.metrics import Metrics
from herd.tokenizer import PromptTooLong
from herd.tokenizer_process import TokenizerProcess

T = TypeVar("T")
log = logging.getLogger("herd.server")

# Names the chat template receives from the request's own fields (or from herd): a
# chat_template_kwargs entry may not replace them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "tools", "add_generation_prompt", "continue_final_message", "template", "options",
     "model_dir", "tokenizer", "model_config", "max_tokens", "offload"}
)


@dataclass
class ServerOptions:
    served_model_names: list[str] = field(default_factory=list)  # empty: the checkpoint's directory name
    chat_template: str | None = None  # template source; None: the checkpoint's
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 5})
    price_input: float = 0.0  # USD per 1M tokens, shown in /v1/models
    price_output: float = 0.0
    max_pending_requests: int | None = None  # admitted at once; None: 4 x max_num_seqs. More -> 503
    max_request_body_bytes: int = 32 * 1024 * 1024
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no CORS headers
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    api_key: str | None = None
    allow_private_image_urls: bool = False  # image URLs on private/loopback hosts (off: SSRF guard)
    owns_engine: bool = True  # start the engine with the app and shut it down with it


class Ticket:
    """One admitted engine request; gives its place back exactly once."""

    def __init__(self, state: ServerState, count: int):
        self.state = state
        self.count = count

    def release(self) -> None:
        # Also called from __del__, which may run on any thread: the count changes under a lock.
        with self.state.pending_lock:
            count, self.count = self.count, 0
            self.state.pending -= count

    def __del__(self):  # a stream that was never started still gives its place back
        self.release()


class ServerState:
    def __init__(self, engine, options: ServerOptions):
        self.engine = engine
        self.options = options
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        names = options.served_model_names or [engine.model_dir.name]
        self.model_names = names
        self.model_name = names[0]
        self.created = int(time.time())
        self.metrics = Metrics(engine, self.model_name)
        self.token_text = TokenText(engine.tokenizer)
        max_num_seqs = engine.max_num_seqs
        self.max_pending = options.max_pending_requests or 4 * max_num_seqs
        self.pending = 0
        self.pending_lock = threading.Lock()
        # A prompt needs room for at least one new token. Longer texts are refused before they are
        # tokenized when their length proves it; long ones are tokenized in another process.
        self.max_prompt_tokens = self.max_model_len - 1
        self.tokenizer_process = TokenizerProcess(self.tokenizer)
        self.tokenizer.max_token_chars  # computed now (about a second of GIL), not on a request
        # Checkpoints with a vision tower take image parts; others refuse them clearly.
        self.accepts_images = engine.accepts_images

    # -- checks ---------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise model_not_found(model)

    def check_admissible(self, count: int, param: str) -> None:
        """A request of more sequences than the server ever admits at once could never run: that is
        the client's error (400, at once), not "busy, retry later" (503), which it would obey forever."""
        if count > self.max_pending:
            raise bad_request(
                f"the request asks for {count} sequences (prompts x n); this server admits at most "
                f"{self.max_pending} at once",
                param=param,
                code="too_many_sequences",
            )

    def admit(self, count: int = 1, param: str = "n") -> Ticket:
        self.check_admissible(count, param)
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", headers={"retry-after": "5"})
        with self.pending_lock:
            if self.pending + count > self.max_pending:
                raise APIError(
                    503,
                    f"the server is overloaded ({self.pending} requests pending, limit {self.max_pending}); "
                    "retry later",
                    code="overloaded",
                    headers={"retry-after": "1"},
                )
            self.pending += count
        return Ticket(self, count)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            self.engine.check_prompt(prompt_ids, params)
        except ValueError as e:
            message = str(e)
            raise bad_request(message, param="logit_bias" if "logit_bias" in message else param) from None

    # -- tokenization (off the event loop: a huge prompt must not stall other clients) ------
    async def encode_chat(self, messages, *, tools=None, add_generation_prompt=True, continue_final_message=False,
                          chat_template_kwargs=None) -> ChatPrompt:
        """Prompt ids and images; image fetching and decoding happen here too, off the loop."""
        reserved = sorted(set(chat_template_kwargs or ()) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise bad_request(
                f"chat_template_kwargs cannot set {', '.join(reserved)}: send them as request fields",
                param="chat_template_kwargs",
            )
        options = ImageOptions(
            limit_per_prompt=self.options.limit_mm_per_prompt.get("image", 0),
            allow_private_urls=self.options.allow_private_image_urls,
        )

        def run():
            return build_chat_prompt(
                self.tokenizer,
                self.engine.config,
                messages,
                options=options,
                model_dir=self.engine.model_dir,
                tools=tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                template=self.options.chat_template,
                max_tokens=self.max_prompt_tokens,
                offload=self.tokenizer_process,
                **(chat_template_kwargs or {}),
            )

        try:
            return await asyncio.to_thread(run)
        except APIError:
            raise
        except PromptTooLong as e:
            raise self.prompt_too_long(e, "messages") from None
        except (ImageError, FetchError, ImageLimitError) as e:  # bad or too many images: say which
            raise bad_request(str(e), param="messages") from None
        except (ValueError, jinja2.TemplateError) as e:  # raise_exception, bad shapes: the client's
            raise bad_request(f"could not apply the chat template: {e}", param="messages") from None
        except Exception:  # anything else says nothing useful to the client (and names our code)
            log.warning("chat template failed", exc_info=True)
            raise bad_request("could not apply the chat template to these messages", param="messages") from None

    async def encode_text(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """A text prompt's ids, with the special tokens the tokenizer itself adds (never a second BOS)."""
        try:
            return await asyncio.to_thread(
                self.tokenizer.encode, text, add_special_tokens=add_special_tokens, max_tokens=self.max_prompt_tokens,
                offload=self.tokenizer_process,
            )
        except PromptTooLong as e:
            raise self.prompt_too_long(e, param) from None

    def prompt_too_long(self, e: PromptTooLong, param: str) -> APIError:
        return bad_request(
            f"This model's maximum context length is {self.max_model_len} tokens, and the prompt has "
            f"{'' if e.exact else 'at least '}{e.tokens} tokens: no room to generate.",
            param=param,
            code="context_length_exceeded",
        )

    # -- running ------------------------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, ticket: Ticket | None = None,
        prompt: str | None = None,
        images=None,
    ) -> AsyncIterator[Any]:
        """engine.generate with metrics and failure mapping; stopping early aborts the request."""
        record = self.metrics.request(len(prompt_ids))
        try:
            async for out in self.engine.generate(prompt_ids, params, request_id, prompt=prompt, images=images):
                record.on_output(out)
                observe(out)  # usage for the platform ledger (no-op without it)
                if out.finished:
                    raise_if_failed(out)
                yield out
        except ValueError as e:
            raise bad_request(str(e)) from None
        except RuntimeError as e:
            raise APIError(500, str(e)) from None
        finally:
            record.finish(["abort"])  # no-op when it finished normally
            if ticket is not None:
                ticket.release()

    async def final_output(self, prompt_ids, params, request_id, ticket=None, prompt=None, images=None):
        last = None
        async for out in self.generate(prompt_ids, params, request_id, ticket, prompt, images):
            last = out
        return last


def raise_if_failed(out) -> None:
    for o in out.outputs:
        if o.finish_reason == "error":
            raise bad_request(f"the request failed: {o.stop_reason or 'engine error'}")
        if o.finish_reason == "abort":
            raise APIError(503, "the request was aborted (the server is shutting down)", headers={"retry-after": "5"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs `work` unless the client goes away first; then `work` is cancelled (which aborts
    its engine request and frees its KV blocks) and ClientGone is raised."""
    task = asyncio.ensure_future(work)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also reached when this handler itself is cancelled (server shutdown).
        watcher.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:
                pass
            raise ClientGone()
    return task.result()


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleaves several async iterators as (index, item); closing this closes them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except BaseException as e:
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
