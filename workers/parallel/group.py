"""A tensor-parallel group: which rank this is, how many there are, and the
collectives the model layers need.

Each model instance gets its own process group object, built straight from a
TCPStore (not torch.distributed's process-global default group), so two instances,
or two ranks-0 of different instances, can live in one process without colliding.
The store listens on a port the OS hands out: no fixed ports.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """What this rank's collectives moved, for benchmarks and metrics."""

    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    all_to_all_bytes: int = 0  # sent to other ranks (expert parallelism)


# How long a rank waits for its leader's next command: a worker may idle for days.
IDLE_WAIT = datetime.timedelta(days=365)


class RankFailure(RuntimeError):
    """A collective failed or timed out: a rank died or hangs."""


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    pg: Optional[Any] = None  # a ProcessGroupGloo (CPU); None when size == 1
    store: Optional[Any] = None  # the leader's TCPStore must outlive the group
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum across ranks, in place."""
        if self.size > 1:
            _run(lambda: self.pg.allreduce([x]))
            self.traffic.all_reduce_calls += 1
            self.traffic.all_reduce_bytes += x.numel() * x.element_size()
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        _run(lambda: self.pg.allgather([parts], [x.contiguous()]))
        return torch.cat(parts, dim=-1)

    # Expert parallelism (workers/models/expert_parallel.py): tokens resident on each
    # rank in turn, padded to equal blocks where the collective wants them.
    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x [size * m, ...] on every rank → the sum of block `rank` [m, ...]."""
        out = x.new_empty(x.shape[0] // self.size, *x.shape[1:])
        _run(lambda: self.pg._reduce_scatter_base(out, x.contiguous()))
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [m, ...] on every rank → [size * m, ...], rank 0's block first."""
        out = x.new_empty(x.shape[0] * self.size, *x.shape[1:])
        _run(lambda: self.pg._allgather_base(out, x.contiguous()))
        return out

    def all_to_all(self, x: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        """Rows send_rows[d] of x (in order) to rank d; recv_rows[s] rows from rank s."""
        out = x.new_empty(sum(recv_rows), *x.shape[1:])
        _run(lambda: self.pg.alltoall_base(out, x.contiguous(), recv_rows, send_rows, dist.AllToAllOptions()))
        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.traffic.all_to_all_bytes += (sum(send_rows) - send_rows[self.rank]) * row_bytes
        return out

    def broadcast_object(self, obj: Any = None, idle: bool = False) -> Any:
        """The leader's `obj` on every rank (pickled into a byte tensor). `idle`: a
        rank waiting for its next command waits as long as the leader idles (a dead
        leader still shows at once: its connections close); the group's timeout
        applies to everything else."""
        if self.is_leader:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        _run(lambda: self.pg.broadcast(size, 0, timeout=IDLE_WAIT) if idle else self.pg.broadcast(size, 0))
        if not self.is_leader:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        _run(lambda: self.pg.broadcast(data, 0))
        return obj if self.is_leader else pickle.loads(data.numpy().tobytes())


def _run(start: Callable[[], Any]) -> None:
    """Start a collective and wait for it: either can fail on a dead peer's closed
    connection (starting it fails at once), and both say so as a RankFailure."""
    try:
        start().wait()
    except RuntimeError as e:
        raise RankFailure(f"tensor-parallel collective failed: {e}") from e


def open_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The leader's rendezvous store, on a port the OS picks (read it from .port)."""
    return dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_group(store: Optional[dist.TCPStore], host: str, port: int, rank: int, size: int,
               timeout_s: float) -> TPGroup:
    """Build this rank's process group; blocks until every rank has joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, size, False, timeout=timeout)
    pg = dist.ProcessGroupGloo(store, rank, size, timeout)
    return TPGroup(rank=rank, size=size, pg=pg, store=store)
