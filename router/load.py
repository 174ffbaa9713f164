"""A worker's load report, as dispatch policies read it (worker → manager → routers).

Pure Python: no torch, no ray. The worker fills it from its engine between steps; the
cluster manager forwards snapshots of these to every router replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from workers.load_report import LoadReport, freeness  # noqa: F401  (the worker computes freeness; re-exported)

ROLES = ("mixed", "prefill", "decode", "attention", "expert")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerLoad:
    """One worker's state at `reported_at` (the worker's clock, seconds)."""

    worker_id: str
    role: str = "mixed"
    healthy: bool
    num_running: int
    num_waiting: int
    free_blocks: int
    total_blocks: int
    freeness: float  # see freeness() above
    mean_step_time_s: float
    # Chained hashes (workers.engine.block_manager.chain_hash) of cached full blocks.
    # The worker bounds the set; it should keep whole chains from their first block,
    # because dispatch counts consecutive hits from a prompt's first block.
    cached_block_hashes: frozenset[int] = field(default_factory=frozenset)
    reported_at: float
    queued_prefill_tokens: int = 0  # prompt tokens admitted and not yet computed

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must be a non-empty string")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {self.role!r}")
        for name in ("num_running", "num_waiting", "free_blocks", "total_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.free_blocks > self.total_blocks:
            raise ValueError(f"free_blocks ({self.free_blocks}) must be <= total_blocks ({self.total_blocks})")
        # freeness may be negative (overload) but must be a number policies can compare.
        if math.isnan(self.freeness):
            raise ValueError("freeness must be a number, got nan")
        if not self.mean_step_time_s >= 0:
            raise ValueError(f"mean_step_time_s must be >= 0, got {self.mean_step_time_s}")
        if not isinstance(self.cached_block_hashes, frozenset):
            raise ValueError(f"cached_block_hashes must be a frozenset, "
                             f"got {type(self.cached_block_hashes).__name__}")

    @property
    def queue_length(self) -> int:
        """Requests on the worker, running or waiting: the load that the p2c policy and
        the prefix-aware imbalance guard compare."""
        return self.num_running + self.num_waiting


def worker_load(report: LoadReport, healthy: bool = True) -> WorkerLoad:
    """A worker's load report as dispatch reads it; `healthy`: the manager's view too.
    A draining worker takes nothing new: to dispatch it is as good as down."""
    return WorkerLoad(worker_id=report.worker_id, role=report.role,
                      healthy=healthy and report.healthy and not report.draining,
                      num_running=report.num_running, num_waiting=report.num_waiting,
                      free_blocks=report.free_blocks, total_blocks=report.total_blocks, freeness=report.freeness,
                      mean_step_time_s=report.mean_step_time_s, cached_block_hashes=report.cached_block_hashes,
                      reported_at=report.reported_at, queued_prefill_tokens=report.queued_prefill_tokens)
