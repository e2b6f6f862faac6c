"""The offline door: `LLM(model).generate(...)` and `LLM.chat(...)`, with the engine in-process.

The frontend (chat template, images -> token ids and pixels) lives here and in the server, above
the engine: the engine only ever sees token ids and pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from herd.engine.engine import _load_engine
from herd.engine.outputs import RequestOutput
from herd.engine.sampling import SamplingParams

__all__ = ["LLM"]


class LLM:
    """Offline generation: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        limit_mm_per_prompt: int = 5,
        allow_private_image_urls: bool = False,
        **engine_options: Any,
    ):
        if not isinstance(limit_mm_per_prompt, int) or limit_mm_per_prompt < 0:
            raise ValueError(f"limit_mm_per_prompt must be a non-negative integer, got {limit_mm_per_prompt!r}")
        self.engine = _load_engine(model, dtype, device, engine_options)
        self.limit_mm_per_prompt = limit_mm_per_prompt
        self.allow_private_image_urls = allow_private_image_urls
        self.model_dir = self.engine.model_dir
        self.config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.device = self.engine.device
        self.model = self.engine.runner.model

    def close(self) -> None:
        """Stops the worker processes of a tensor-parallel engine (a no-op on one device)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One result per prompt, in order. A prompt is a string or a list of token ids;
        `params` is one SamplingParams for all prompts or a list with one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        if len(all_params) != len(prompts):
            raise ValueError(f"{len(all_params)} SamplingParams for {len(prompts)} prompts")
        requests = []
        for prompt, p in zip(prompts, all_params):
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, add_special_tokens=True)  # the tokenizer's own BOS rule
                requests.append((ids, p, prompt))
            else:
                requests.append((list(prompt), p, None))
        return self._run(requests)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """One result per conversation; a single conversation is a list of message dicts.

        Messages take the OpenAI form, images included: content parts
        `{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." or "https://..."}}`
        (or `{"type": "image", "image": <PIL image or bytes>}`).
        """
        from herd.chat_prompt import ImageOptions, build_chat_prompt

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        all_params = params if isinstance(params, list) else [params] * len(conversations)
        options = ImageOptions(
            limit_per_prompt=self.limit_mm_per_prompt, allow_private_urls=self.allow_private_image_urls
        )
        requests = []
        for conversation, p in zip(conversations, all_params):
            chat = build_chat_prompt(
                self.tokenizer,
                self.config,
                conversation,
                options=options,
                model_dir=self.model_dir,  # the checkpoint's image-processor settings
                tools=tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                template=chat_template,
                **(chat_template_kwargs or {}),
            )
            requests.append((chat.prompt_ids, p, None, chat.images))
        return self._run(requests)

    def _run(self, requests: list[tuple]) -> list[RequestOutput]:
        ids = []
        final: dict[str, RequestOutput] = {}
        try:
            for prompt_ids, params, prompt, *images in requests:
                ids.append(self.engine.add_request(prompt_ids, params, prompt=prompt, images=images[0] if images else None))
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                if not self.engine.has_unfinished() and len(final) < len(ids):
                    raise RuntimeError("the engine stopped with requests unfinished")
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [final[rid] for rid in ids]
