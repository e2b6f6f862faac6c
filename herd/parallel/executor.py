"""Rank 0 of a tensor-parallel model: starts the worker ranks, then, every step, broadcasts the
scheduled batch to them and runs its own shard.

Rank 0 lives in the engine process (not in a worker of its own): one process fewer per model,
and the step input crosses no extra process boundary before it is broadcast. The executor has
the Runner's surface (`execute(batch)`, `model`, `vision_model`), so the engine does not know
whether it drives one device or N.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import socket
import subprocess
import sys

import torch

from herd.engine.kv_cache import KVCache
from herd.engine.runner import Runner, ScheduledSeq
from herd.parallel.comm import Group, start_timeout_s
from herd.parallel.sizes import check_size
from herd.parallel.step import CacheSpec, to_message
from herd.parallel.nodes import Layout, layout_from
from herd.parallel.worker import SPEC_ENV, WorkerSpec, load_rank, run_worker

log = logging.getLogger("herd.parallel")

JOIN_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RankFailure(RuntimeError):
    """A rank died, hung past the collective timeout, or failed mid-step: the ranks are out of
    step with each other, so the engine cannot go on (unlike a failed single-device step)."""

    fatal = True


class ParallelExecutor(Runner):
    """Runner of rank 0: the same `execute(batch)`, run by every rank at once."""

    def __init__(
        self, model, cache: KVCache, device: torch.device, group: Group, workers: list, grammars=None,
        step_sizes: tuple[int, int] = (64, 2048),
    ):
        """step_sizes: the engine's max_num_seqs and max_num_batched_tokens (the workers warm up
        their CPU kernels for the same shapes rank 0 does)."""
        super().__init__(model, cache, device, grammars=grammars)
        self.group = group
        self.workers = workers
        self.closed = False
        self.failure: RankFailure | None = None
        # The workers may still be loading their shards: wait as long as start-up may take.
        spec = CacheSpec({g: p.num_blocks for g, p in cache.pools.items()}, cache.block_size, cache.kv_dtype,
                         *step_sizes)
        group.broadcast_object(spec, timeout_s=start_timeout_s())

    def execute(self, batch: list[ScheduledSeq]):
        self.check()
        try:
            self.group.broadcast_object(to_message(batch))
            return super().execute(batch)
        except Exception as e:
            self.failure = RankFailure(f"tensor-parallel step failed ({self._workers_state()}): {e}")
            raise self.failure from e

    def check(self) -> None:
        """Raises RankFailure if the group is broken or a worker process has exited."""
        if self.failure is None:
            dead = [i + 1 for i, p in enumerate(self.workers) if p.poll() is not None]
            if dead:
                self.failure = RankFailure(f"tensor-parallel rank(s) {dead} exited ({self._workers_state()})")
            elif self.closed:
                self.failure = RankFailure("the tensor-parallel workers were stopped")
        if self.failure is not None:
            raise self.failure

    def _workers_state(self) -> str:
        codes = [p.poll() for p in self.workers]
        return ", ".join(f"rank {i + 1}: " + ("running" if c is None else f"exit code {c}") for i, c in enumerate(codes))

    def close(self) -> None:
        """Tells the workers to stop, waits for them, and leaves the process group."""
        if self.closed:
            return
        self.closed = True
        if self.failure is None:
            try:
                self.group.broadcast_object(None)
            except Exception as e:  # a worker is gone already
                log.warning("could not tell the workers to stop: %s", e)
                self.failure = RankFailure(str(e))
        if self.failure is not None:  # the survivors may sit in a collective: end them now
            for p in self.workers:
                p.kill()
        stop_workers(self.workers)
        self.group.close()


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for p in workers:
        try:
            p.wait(JOIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(JOIN_TIMEOUT_S)


def start_workers(spec: WorkerSpec, layout: Layout) -> list[subprocess.Popen]:
    """One process per worker rank this node starts, a fresh interpreter running
    herd.parallel.worker (not multiprocessing: that would re-run the caller's script in each
    worker, and a fork would copy the engine process's threads and CUDA state)."""
    encoded = base64.b64encode(pickle.dumps(spec)).decode()
    workers = []
    for rank in layout.ranks_to_start():
        cmd = [sys.executable, "-m", "herd.parallel.worker", "--rank", str(rank),
               "--local-rank", str(layout.local_rank_of(rank)), "--parent-pid", str(os.getpid())]
        workers.append(subprocess.Popen(cmd, env={**os.environ, SPEC_ENV: encoded}))
    return workers


def worker_spec(model_dir, config, dtype: torch.dtype, device: torch.device, quantization, options, layout: Layout):
    size = options.tensor_parallel_size
    check_size(config.text, size, options.enable_expert_parallel)
    if device.type == "cuda" and torch.cuda.device_count() < layout.per_node:
        raise ValueError(
            f"{layout.per_node} ranks on this node need {layout.per_node} GPUs; it has {torch.cuda.device_count()}"
        )
    threads = None
    if device.type == "cpu":  # --cpu-threads is per rank; by default this node's ranks share its cores
        from herd.engine.options import default_cpu_threads

        threads = options.cpu_threads or max(1, default_cpu_threads() // layout.per_node)
    return WorkerSpec(str(model_dir), dtype, device.type, size, options.enable_expert_parallel, layout.endpoint,
                      quantization, threads)


def run_headless(model_dir, config, dtype: torch.dtype, device: torch.device, quantization, options) -> int:
    """A node other than node 0 (or a torchrun process other than rank 0): hosts its ranks and
    serves nothing; returns when they end (rank 0 stopped them, or failed)."""
    layout = layout_from(options, free_port)
    spec = worker_spec(model_dir, config, dtype, device, quantization, options, layout)
    if layout.launched:  # torchrun made this process one rank: be it
        run_worker(spec, layout.rank, layout.local_rank)
        return 0
    workers = start_workers(spec, layout)
    log.info("node %d: ranks %s started; rank 0 is on %s", layout.node_rank, list(layout.ranks_to_start()),
             spec.endpoint.url)
    codes = [p.wait() for p in workers]
    return max(codes, default=0)


def start_parallel(model_dir, config, dtype: torch.dtype, device: torch.device, quantization, options):
    """Checks the size, starts ranks 1..N-1, joins as rank 0 and loads rank 0's shard.

    Returns (rank 0's text model, vision model or None, a factory that makes the executor once
    the engine has sized the KV cache).
    """
    layout = layout_from(options, free_port)
    if layout.node_rank != 0 or layout.rank != 0:
        raise ValueError("only node 0 (rank 0) runs the engine; other nodes run `herd serve ... --node-rank K`")
    spec = worker_spec(model_dir, config, dtype, device, quantization, options, layout)
    workers = start_workers(spec, layout)
    try:
        group, model, vision, _ = load_rank(spec, 0, 0)
    except BaseException:
        stop_workers(workers)
        raise

    return model, vision, ExecutorFactory(group, workers, (options.max_num_seqs, options.max_num_batched_tokens))


class ExecutorFactory:
    """Makes rank 0's executor once the engine has sized the KV cache (the workers wait for
    that size), or ends the workers if the engine could not be built."""

    def __init__(self, group: Group, workers: list, step_sizes: tuple[int, int]):
        self.group = group
        self.workers = workers
        self.step_sizes = step_sizes

    def __call__(self, model, cache: KVCache, device: torch.device, grammars=None) -> ParallelExecutor:
        return ParallelExecutor(model, cache, device, self.group, self.workers, grammars, self.step_sizes)

    def abort(self) -> None:
        for p in self.workers:
            p.kill()
        stop_workers(self.workers)
        self.group.close()
