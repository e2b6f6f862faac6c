"""A worker rank: loads its shard, allocates its KV cache, then runs every step rank 0 sends
until rank 0 says stop (or goes away: then a collective fails and the worker exits)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch

from herd.parallel.comm import Endpoint, Group, Rank
from herd.parallel.sizes import Shard

log = logging.getLogger("herd.parallel")

SPEC_ENV = "HERD_WORKER_SPEC"  # the pickled WorkerSpec, base64, set by the process that starts workers


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its shard; the same for every rank."""

    model_dir: str
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda"
    size: int
    expert_parallel: bool
    endpoint: Endpoint | None  # None: torchrun's
    quantization: str | None = None
    threads: int | None = None  # CPU threads per rank (None: torch's default)


def rank_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def load_rank(spec: WorkerSpec, rank: int, local_rank: int):
    """Joins the group and loads this rank's text shard and (replicated) vision tower."""
    from herd.checkpoint import load_text_model
    from herd.config import load_config

    device = rank_device(spec.device_type, local_rank)
    group = Group(rank, spec.size, device, spec.endpoint)
    try:
        config = load_config(spec.model_dir)
        parallel = Rank(Shard(rank, spec.size, spec.expert_parallel), group)
        model = load_text_model(spec.model_dir, config, spec.dtype, device, spec.quantization, parallel)
        vision = None
        if config.is_multimodal and config.vision is not None:
            from herd.model.vision import load_vision_model

            vision = load_vision_model(spec.model_dir, config, spec.dtype, device)
    except BaseException:
        group.close()
        raise
    return group, model, vision, device


def _exit_with_parent(parent: int) -> None:
    """A worker never outlives the process that started it (even after kill -9 of that one)."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def run_worker(spec: WorkerSpec, rank: int, local_rank: int, parent_pid: int | None = None) -> None:
    """The worker process's entry point."""
    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    from herd.engine.kv_cache import KVCache
    from herd.engine.runner import Runner
    from herd.parallel.step import from_message

    try:
        group, model, vision, device = load_rank(spec, rank, local_rank)
    except BaseException:
        log.exception("rank %d could not load its shard", rank)
        sys.exit(1)
    try:
        cache_spec = group.broadcast_object()
        cache = KVCache(model.config, cache_spec.num_blocks, cache_spec.block_size, spec.dtype, device, cache_spec.kv_dtype)
        runner = Runner(model, cache, device, vision)
        if device.type == "cpu":  # as the engine does on rank 0
            from herd.model.llama4 import warm_up_experts

            torch.set_flush_denormal(True)
            model.prepack_for_cpu(cache_spec.max_num_seqs)
            warm_up_experts(model, cache_spec.max_num_batched_tokens)
        while True:
            message = group.broadcast_object()
            if message is None:
                break
            runner.execute(from_message(message))
    except BaseException:
        log.exception("rank %d failed", rank)
        os._exit(1)  # the others see their next collective fail
    group.close()


def main(argv: list[str] | None = None) -> None:
    import argparse
    import base64
    import pickle

    p = argparse.ArgumentParser(description="one worker rank of a tensor-parallel herd model")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--local-rank", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s")
    spec = pickle.loads(base64.b64decode(os.environ[SPEC_ENV]))
    run_worker(spec, args.rank, args.local_rank, args.parent_pid)


if __name__ == "__main__":
    main()
