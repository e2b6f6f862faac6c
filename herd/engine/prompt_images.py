"""Puts images into a tokenized prompt: each image placeholder becomes the image's tokens.

The chat template writes one `<|image|>` placeholder per image part. Each is replaced by the
image's full token layout (tile rows of `<|patch|>` tokens, separators, the global thumbnail),
and the positions of its `<|patch|>` tokens are recorded: that is where the vision features go.
User text never yields a placeholder (it is encoded as text), so counting them is reliable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from herd.engine.request import ImageInput


def expand_image_placeholders(
    prompt_ids: list[int],
    images: Sequence,  # herd.multimodal.ProcessedImage: .pixel_values, .grid, .content_hash
    placeholder_id: int,
    patch_id: int,
    layout: Callable[[tuple[int, int]], list[int]],
) -> tuple[list[int], list[ImageInput]]:
    """Returns the expanded prompt and one ImageInput per image, in order."""
    placeholders = [i for i, t in enumerate(prompt_ids) if t == placeholder_id]
    if len(placeholders) != len(images):
        raise ValueError(f"the prompt has {len(placeholders)} image placeholders for {len(images)} images")
    out: list[int] = []
    inputs: list[ImageInput] = []
    previous = 0
    for at, image in zip(placeholders, images):
        out.extend(prompt_ids[previous:at])
        tokens = layout(image.grid)
        base = len(out)
        patch_positions = [base + j for j, t in enumerate(tokens) if t == patch_id]
        tiles = image.pixel_values.shape[0]
        if len(patch_positions) % tiles:
            raise ValueError(f"{len(patch_positions)} patch tokens do not split over {tiles} tiles")
        out.extend(tokens)
        inputs.append(ImageInput(torch.as_tensor(image.pixel_values), image.content_hash, patch_positions))
        previous = at + 1
    out.extend(prompt_ids[previous:])
    return out, inputs
