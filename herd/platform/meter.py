"""What the HTTP routes tell the platform about the request they are serving, through a context
variable the platform middleware sets (both hooks do nothing when the platform is not installed):

    await reserve(prompt_tokens, max_tokens, n=..., images=...)  once the prompt is tokenized; raises
        RateLimited (-> 429) when the key's tokens-per-minute budget cannot hold it
    observe(out)  every RequestOutput the engine yields (its usage so far)

Imports nothing heavy: herd.server imports it unconditionally.
"""

from __future__ import annotations

import contextvars
from typing import Any

_current: contextvars.ContextVar[Any] = contextvars.ContextVar("herd_platform_meter", default=None)


async def reserve(prompt_tokens: int, max_tokens: int | None, *, n: int = 1, images: int = 0) -> None:
    """Reserves prompt + max_tokens per sample (the configured default when the client sent no
    max_tokens) against the caller's tokens-per-minute, and records the admission."""
    meter = _current.get()
    if meter is not None:
        await meter.reserve(prompt_tokens, max_tokens, n=n, images=images)


def observe(out: Any) -> None:
    """Notes an engine output's usage (prompt, generated and cached tokens) for the ledger."""
    meter = _current.get()
    if meter is not None:
        meter.outputs[out.request_id] = (len(out.prompt_token_ids), out.num_generated_tokens, out.num_cached_tokens)
