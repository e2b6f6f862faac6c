"""Engine options, checked against the model's config before any weight is read.

Loading a large checkpoint takes minutes; an option that cannot work (a typo, a block size that
does not divide the attention chunk, a context longer than the model's) must fail first, in one
clear message, not after the load.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from herd.config import ModelConfig

log = logging.getLogger("herd.engine")

DEFAULT_BLOCK_SIZE = 16
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass
class EngineOptions:
    kv_cache_tokens: int | None = None  # None: a default sized for the device
    block_size: int | None = None  # None: 16, or the largest divisor of attention_chunk_size below it
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9  # on CUDA, the share of free memory the KV cache may take
    kv_cache_dtype: str = "auto"  # "fp8": K/V in E4M3 with per-token scales, about half the bytes
    tensor_parallel_size: int = 1  # ranks (devices) one model is split over; see herd.parallel
    enable_expert_parallel: bool = False  # routed experts whole on each rank instead of sliced
    # Several hosts: tensor_parallel_size is the total; node 0 runs the engine, the others their ranks.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # where rank 0 (node 0) listens for the others
    master_port: int | None = None  # None: any free port (one node only)
    cpu_threads: int | None = None  # torch threads on CPU; None: default_cpu_threads()


def default_cpu_threads() -> int:
    """Every core this process may run on but one, at least one. As vLLM's CPU build does, a
    core is left to the front end (tokenizing, HTTP, the engine's own Python): on a busy or
    small machine a second OpenMP thread that must wait for a core slows every matmul down."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def engine_options_from(kwargs: dict[str, Any]) -> EngineOptions:
    """EngineOptions from keyword arguments; an unknown name is a ValueError that lists the known ones."""
    known = {f.name for f in dataclasses.fields(EngineOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"herd's engine options are {', '.join(sorted(known | {'quantization', 'revision', 'download_dir'}))}"
        )
    return EngineOptions(**kwargs)


def choose_block_size(chunk_size: int | None) -> int:
    """The default block size: 16, or for a chunk it does not divide, the largest divisor of the
    chunk below 16 (a chunked layer frees its blocks at chunk boundaries, so a block must never
    straddle one)."""
    if chunk_size is None or chunk_size % DEFAULT_BLOCK_SIZE == 0:
        return DEFAULT_BLOCK_SIZE
    return max(d for d in range(1, DEFAULT_BLOCK_SIZE + 1) if chunk_size % d == 0)


def resolve_engine_options(options: EngineOptions, config: ModelConfig) -> EngineOptions:
    """A copy of `options` with the block size chosen; raises ValueError for options this model
    cannot run with. Reads only the config: call it before loading weights."""
    text = config.text
    chunk = text.attention_chunk_size
    block_size = options.block_size
    if block_size is None:
        block_size = choose_block_size(chunk)
        if block_size != DEFAULT_BLOCK_SIZE:
            log.info(
                "block size %d (the default %d does not divide attention_chunk_size %d)",
                block_size, DEFAULT_BLOCK_SIZE, chunk,
            )
    elif block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    elif chunk is not None and chunk % block_size:
        raise ValueError(
            f"block_size {block_size} must divide attention_chunk_size {chunk}; "
            f"leave it unset to have one chosen ({choose_block_size(chunk)})"
        )
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(options, name)}")
    longest = text.max_position_embeddings
    if options.max_model_len is not None and not 1 < options.max_model_len <= longest:
        raise ValueError(
            f"max_model_len {options.max_model_len} must be in [2, {longest}] "
            f"(this model's max_position_embeddings)"
        )
    if options.cpu_threads is not None and (not isinstance(options.cpu_threads, int) or options.cpu_threads < 1):
        raise ValueError(f"cpu_threads must be a positive integer, got {options.cpu_threads!r}")
    if options.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unsupported kv_cache_dtype {options.kv_cache_dtype!r}: use one of {KV_CACHE_DTYPES}")
    if options.kv_cache_tokens is not None and options.kv_cache_tokens < block_size:
        raise ValueError(f"kv_cache_tokens {options.kv_cache_tokens} is less than one block ({block_size} tokens)")
    if options.tensor_parallel_size != 1 or options.enable_expert_parallel:
        from herd.parallel.sizes import check_size

        from herd.parallel.nodes import check_nodes

        check_size(text, options.tensor_parallel_size, options.enable_expert_parallel)
        check_nodes(options.tensor_parallel_size, options.nnodes, options.node_rank)
    if not 0 < options.gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {options.gpu_memory_utilization}")
    return dataclasses.replace(options, block_size=block_size)


def check_quantization(config: ModelConfig, quantization: str | None) -> None:
    """The requested on-load quantization exists, and an FP8 checkpoint's own scheme is one herd loads."""
    from herd.checkpoint import fp8_ignore_list
    from herd.model.quant import resolve_policy

    resolve_policy(quantization)
    if config.quantization:
        fp8_ignore_list(config.quantization)


def check_image_limits(limits: dict[str, int], config: ModelConfig, *, explicit: bool) -> None:
    """--limit-mm-per-prompt against the model: counts are non-negative, images are the only
    modality herd takes, and asking for images from a model without a vision tower is an error
    (the built-in default is not: it simply never applies)."""
    for modality, count in limits.items():
        if count < 0:
            raise ValueError(f"--limit-mm-per-prompt: {modality} must be at least 0, got {count}")
        if modality != "image" and count > 0:
            raise ValueError(f"--limit-mm-per-prompt: herd's models take images only, not {modality}")
    if explicit and limits.get("image", 0) > 0 and not (config.is_multimodal and config.vision):
        raise ValueError("--limit-mm-per-prompt: this model has no vision tower, so it takes no images")


def check_before_loading(model_dir, config: ModelConfig, engine_options: dict[str, Any], dtype: Any = "auto") -> EngineOptions:
    """Everything about a model and its options that can be checked without reading weights:
    the engine options (resolved), the quantization, the dtype and the saved image-processor
    settings. `herd serve` calls it before it starts the engine core, _load_engine before loading."""
    options = dict(engine_options)
    quantization = options.pop("quantization", None)
    for name in ("revision", "download_dir"):  # where the files came from: already resolved
        options.pop(name, None)
    resolved = resolve_engine_options(engine_options_from(options), config)
    check_quantization(config, quantization)
    if dtype != "auto" and not hasattr(dtype, "is_floating_point"):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if config.is_multimodal and config.vision is not None:
        from herd.model.vision import VisionConfig

        VisionConfig.from_model_config(config, model_dir)  # the saved image-processor settings
    return resolved
