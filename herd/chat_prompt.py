"""OpenAI-style chat messages (text and images) -> prompt token ids and image inputs.

Shared by `LLM.chat` and the HTTP server, so both see images the same way: image parts are
loaded (data: URLs decoded, http(s) URLs fetched safely), tiled and normalised; the chat
template renders one `<|image|>` placeholder per image part; each placeholder then becomes the
image's token layout, whose `<|patch|>` positions receive the vision features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from herd.engine.prompt_images import expand_image_placeholders
from herd.engine.request import ImageInput
from herd.image_fetch import fetch_url
from herd.tokenizer import Tokenizer

IMAGE_PART_TYPES = ("image_url", "input_image", "image")


class ImageLimitError(ValueError):
    pass


@dataclass
class ImageOptions:
    limit_per_prompt: int = 5  # Meta's tested limit for Llama 4 (model card)
    max_tiles: int | None = None  # None: the checkpoint's (preprocessor_config.json), else 16
    fetch_timeout: float = 10.0
    max_image_bytes: int = 20 * 2**20
    allow_private_urls: bool = False


@dataclass
class ChatPrompt:
    prompt_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)


def image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every image content part of the conversation, in order."""
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts.extend(p for p in content if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES)
    return parts


def _image_source(part: dict[str, Any]):
    """The URL string, raw bytes or PIL image an image part carries."""
    value = part.get("image_url", part.get("image"))
    if isinstance(value, dict):
        value = value.get("url")
    if value is None:
        raise ValueError("an image part has no image_url.url")
    return value


def load_part_image(part: dict[str, Any], options: ImageOptions):
    from herd import multimodal

    source = _image_source(part)
    if isinstance(source, str):
        if source.startswith("data:"):
            data = multimodal.decode_data_url(source)
        else:
            data = fetch_url(
                source,
                timeout=options.fetch_timeout,
                max_bytes=options.max_image_bytes,
                allow_private=options.allow_private_urls,
            )
        return multimodal.load_image(data)
    if isinstance(source, (bytes, bytearray)):
        return multimodal.load_image(bytes(source))
    return source  # already a PIL image (offline use)


def build_chat_prompt(
    tokenizer: Tokenizer,
    model_config,
    messages: list[dict[str, Any]],
    *,
    options: ImageOptions | None = None,
    model_dir=None,
    **template_args: Any,
) -> ChatPrompt:
    """Renders the conversation; raises ValueError subclasses naming any bad image."""
    options = options or ImageOptions()
    parts = image_parts(messages)
    if len(parts) > options.limit_per_prompt:
        raise ImageLimitError(
            f"at most {options.limit_per_prompt} images per request are allowed; got {len(parts)}"
        )
    prompt_ids = tokenizer.apply_chat_template(messages, **template_args)
    if not parts:
        return ChatPrompt(prompt_ids)
    if not model_config.is_multimodal or model_config.vision is None:
        raise ValueError("this model does not accept images")
    from herd import multimodal
    from herd.model.vision import VisionConfig

    vision = VisionConfig.from_model_config(model_config, model_dir)
    processed = [
        multimodal.preprocess(load_part_image(part, options), vision, max_tiles=options.max_tiles)
        for part in parts
    ]
    prompt_ids, images = expand_image_placeholders(
        prompt_ids,
        processed,
        placeholder_id=tokenizer.token_to_id("<|image|>"),
        patch_id=tokenizer.token_to_id("<|patch|>"),
        layout=lambda grid: multimodal.image_token_ids(grid, vision.tokens_per_tile, tokenizer),
    )
    return ChatPrompt(prompt_ids, images)
