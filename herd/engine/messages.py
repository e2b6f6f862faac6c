"""What the API server and the engine-core process say to each other, encoded with msgspec
(msgpack). Each message is a ZeroMQ multipart message: [kind, msgpack body, *raw tensor frames].

Outputs travel as deltas (new token ids and logprobs, never text: the API server detokenizes and
matches stop strings itself): the client adds them up, so a long generation costs the same bytes
per step as a short one. Image pixels never go through
msgpack or pickle: each tensor is one raw frame, described by an ImageMeta in the body.
"""

from __future__ import annotations

import warnings
from typing import Any

import msgspec
import torch

from herd.engine.engine import EngineStats, PromptLimits
from herd.engine.request import ImageInput
from herd.engine.sampling import SamplingParams

# Frame 0 of every message.
HELLO = b"hello"  # client -> core: "I am here"; the core answers READY or FAILED
READY = b"ready"
FAILED = b"failed"  # the core could not load the model: the body is the message for the user
ADD = b"add"
ABORT = b"abort"  # request ids, or one sample's sequence id (`rid#i`) that a stop string ended
SHUTDOWN = b"shutdown"  # from the process that owns the core
BYE = b"bye"  # client -> core: this client is leaving; its requests (if any) are aborted
OUTPUTS = b"outputs"


class ReadyInfo(msgspec.Struct):
    """What the API server needs to know about the engine it talks to."""

    pid: int
    model_dir: str
    max_num_seqs: int
    limits: PromptLimits
    generation_defaults: dict[str, Any]
    accepts_images: bool  # the checkpoint has a vision tower


class ImageMeta(msgspec.Struct, array_like=True):
    shape: list[int]
    dtype: str  # torch dtype name, e.g. "float32"
    content_hash: bytes
    patch_positions: list[int]


class AddRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    images: list[ImageMeta] = []


class SeqDelta(msgspec.Struct, array_like=True):
    """What one of a request's n samples gained in one step (herd.engine.outputs.SeqTokens)."""

    index: int
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # None when the request asked for none
    finish_reason: str | None  # "stop" here is a stop token; stop strings are the API server's
    stop_reason: int | str | None


class RequestDelta(msgspec.Struct, array_like=True):
    """herd.engine.outputs.RequestTokens on the wire: only the samples that changed."""

    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    num_cached_tokens: int
    prompt_logprobs: list[dict[int, float] | None] | None  # sent once, with the first delta


class RequestError(msgspec.Struct, array_like=True):
    request_id: str
    invalid: bool  # True: the request itself is bad (a 400); False: the engine failed it (a 500)
    message: str


class StepOutputs(msgspec.Struct, array_like=True):
    """Everything one client gets from one engine step, in one message."""

    outputs: list[RequestDelta]
    errors: list[RequestError]
    stats: EngineStats


encoder = msgspec.msgpack.Encoder()
ready_decoder = msgspec.msgpack.Decoder(ReadyInfo)
add_decoder = msgspec.msgpack.Decoder(AddRequest)
abort_decoder = msgspec.msgpack.Decoder(list[str])
outputs_decoder = msgspec.msgpack.Decoder(StepOutputs)
text_decoder = msgspec.msgpack.Decoder(str)


def request_id_of(buffer) -> str | None:
    """The request id of an ADD message that does not decode as an AddRequest, if it has one."""
    try:
        raw = msgspec.msgpack.decode(buffer)
    except msgspec.MsgspecError:
        return None
    return raw[0] if isinstance(raw, list) and raw and isinstance(raw[0], str) else None


def validation_message(error: Exception) -> str:
    """msgspec's message without its location suffix (" - at `$[2]`"): it speaks of the wire
    format, not of the request."""
    return str(error).split(" - at `", 1)[0]


def image_frames(images: list[ImageInput] | None) -> tuple[list[ImageMeta], list[memoryview]]:
    """Each image's pixels as one raw buffer (no copy for a contiguous tensor)."""
    metas, frames = [], []
    for image in images or []:
        pixels = image.pixel_values.detach().cpu().contiguous()
        metas.append(
            ImageMeta(list(pixels.shape), str(pixels.dtype).removeprefix("torch."), image.content_hash,
                      list(image.patch_positions))
        )
        frames.append(memoryview(pixels.view(torch.uint8).reshape(-1).numpy()))
    return metas, frames


def images_from_frames(metas: list[ImageMeta], frames: list) -> list[ImageInput]:
    if len(metas) != len(frames):
        raise ValueError(f"{len(metas)} image descriptions for {len(frames)} pixel frames")
    images = []
    for meta, frame in zip(metas, frames):
        buffer = frame.buffer if hasattr(frame, "buffer") else frame
        with warnings.catch_warnings():  # the frame is read-only; the vision tower only reads it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buffer, dtype=torch.uint8)
        pixels = flat.view(getattr(torch, meta.dtype)).reshape(meta.shape)
        images.append(ImageInput(pixels, meta.content_hash, list(meta.patch_positions)))
    return images
