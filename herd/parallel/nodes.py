"""Where the ranks of one model run: which ranks each node (host) starts, and how they meet.

`tensor_parallel_size` counts ranks over all nodes; each of `nnodes` nodes hosts the same
number, node k ranks [k * per_node, (k + 1) * per_node) with local ranks (device indices)
0..per_node-1. Node 0's engine process is rank 0 and starts its other local ranks; every other
node starts its ranks and serves nothing ("headless"). Under torchrun, torchrun has started
every rank already and says which one each process is (RANK, LOCAL_RANK, WORLD_SIZE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from herd.parallel.comm import Endpoint


@dataclass(frozen=True)
class Layout:
    size: int
    nnodes: int = 1
    node_rank: int = 0
    endpoint: Endpoint | None = None  # None: torchrun's (env://)
    launched: bool = False  # True under torchrun: this process is one rank, start no others
    rank: int = 0  # this process's rank (torchrun), else the first rank of the node
    local_rank: int = 0

    @property
    def per_node(self) -> int:
        return self.size // self.nnodes

    def ranks_to_start(self) -> range:
        """Ranks this node's process starts as worker processes."""
        if self.launched:
            return range(0)
        first = self.node_rank * self.per_node
        # Node 0's engine process is rank 0 itself.
        return range(first + 1 if self.node_rank == 0 else first, first + self.per_node)

    def local_rank_of(self, rank: int) -> int:
        return rank % self.per_node


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ)


def layout_from(options, free_port) -> Layout:
    """The layout the options (and torchrun's environment, when present) describe."""
    size = options.tensor_parallel_size
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != size:
            raise ValueError(f"torchrun started {world} processes but --tensor-parallel-size is {size}")
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        return Layout(size, int(os.environ.get("GROUP_WORLD_SIZE", 1)), 0, None, True, rank, local)
    check_nodes(size, options.nnodes, options.node_rank)
    port = options.master_port
    if port is None:
        if options.nnodes > 1:
            raise ValueError("--nnodes > 1 needs --master-port (the same on every node)")
        port = free_port()
    elif options.node_rank == 0:
        _check_port_free(options.master_addr, port)
    endpoint = Endpoint(options.master_addr, port)
    first = options.node_rank * (size // options.nnodes)
    return Layout(size, options.nnodes, options.node_rank, endpoint, False, first, 0)


def _check_port_free(addr: str, port: int) -> None:
    """Node 0 listens on the master port: say so now if it cannot, not after a timeout."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("" if addr in ("127.0.0.1", "localhost") else addr, port))
        except OSError as e:
            raise ValueError(f"--master-port {port} cannot be used on this host ({e.strerror}): pick a free port") from None


def check_nodes(size: int, nnodes: int, node_rank: int) -> None:
    if nnodes < 1:
        raise ValueError(f"nnodes must be at least 1, got {nnodes}")
    if size % nnodes:
        raise ValueError(
            f"tensor_parallel_size {size} (the total over all nodes) does not split evenly over {nnodes} nodes"
        )
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank must be in [0, {nnodes}), got {node_rank}")
