"""The process groups of one model's ranks, and the few collectives the sharded model needs.

Two groups over the same ranks (besides the default one, used only to meet at start-up, with
a long timeout): a compute group carries tensors (NCCL on GPUs, gloo on CPUs) with a bounded
timeout, so a rank that hangs mid-step ends the others with an error;
a gloo "control" group carries each step's input from rank 0 to the workers, with a long
timeout, because a worker legitimately waits there for as long as the server is idle.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from herd.parallel.sizes import Shard



def step_timeout_s() -> float:
    """How long a collective may wait for a peer mid-step before the step fails (seconds)."""
    return float(os.environ.get("HERD_COLLECTIVE_TIMEOUT", "120"))


def start_timeout_s() -> float:
    """How long ranks may take to meet at start-up (workers import torch and herd first)."""
    return float(os.environ.get("HERD_START_TIMEOUT", "600"))
IDLE_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Endpoint:
    """Where the ranks of one model meet (torch.distributed's TCP rendezvous)."""

    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def url(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


class Group:
    """This process's rank in the model's process groups."""

    def __init__(self, rank: int, size: int, device: torch.device, endpoint: Endpoint | None):
        """endpoint None: torchrun's rendezvous (MASTER_ADDR/MASTER_PORT, its agent's store)."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=endpoint.url if endpoint is not None else "env://",
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=start_timeout_s()),
        )
        self.rank = rank
        self.size = size
        self.device = device
        self.step_timeout = step_timeout_s()
        self.compute = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=self.step_timeout))
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    # -- tensors (every rank calls these in the same order) --------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.compute)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.compute)
        return torch.cat(parts, dim=-1)

    # -- objects from rank 0 (the step's input: one message per step) --------------------------
    def broadcast_object(self, obj=None, timeout_s: float | None = None):
        """Rank 0 passes the object, the others receive it. One pickle, two collectives (the
        length, then the bytes); tensors inside travel pickled, on the CPU."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            length = torch.tensor([data.numel()], dtype=torch.long)
        else:
            length = torch.zeros(1, dtype=torch.long)
        timeout_s = timeout_s or self.step_timeout
        self._broadcast(length, timeout_s)
        if self.rank != 0:
            data = torch.empty(int(length.item()), dtype=torch.uint8)
        self._broadcast(data, timeout_s)
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())

    def _broadcast(self, x: torch.Tensor, timeout_s: float) -> None:
        """Receivers may wait as long as the server is idle; rank 0, the sender, waits at most
        the step timeout (a gloo send completes only once a receiver has taken it, so a hung
        worker would otherwise hold rank 0 forever)."""
        work = dist.broadcast(x, src=0, group=self.control, async_op=True)
        if self.rank == 0:
            if not work.wait(timeout=datetime.timedelta(seconds=timeout_s)):
                raise TimeoutError(f"a worker rank did not take the message within {timeout_s:.0f} s")
        else:
            work.wait()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class Rank:
    """What a model builder needs to know about its place in the group."""

    shard: Shard
    group: Group
