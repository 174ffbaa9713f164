"""Live-migration policy: which running requests move between workers, and where to.

After Llumnix (OSDI'24). A worker's load is its *virtual usage*: the blocks its running
requests hold, plus what its head-of-line waiting request needs, plus headroom kept free
beside high-priority requests. Freeness is the free blocks left per running request after
all that. Every `interval_s` the cluster manager hands plan() one view per worker and
gets orders back, made by four rules in precedence: drain, defrag, priority, balance
(cluster/migration_rules.py). Moving the KV cache is the mechanism's job, not this one's.

Pure Python (no torch, no ray), the clock injected. Ties are broken by worker_id, then
request_id, so that a plan never depends on the order of the views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Sequence

from cluster.migration_rules import Plan, plan_orders, virtual_freeness as _freeness

if TYPE_CHECKING:
    from workers.load_report import LoadReport

__all__ = ["REASONS", "RULES", "MigrationConfig", "MigrationOrder", "MigrationPolicy", "RequestView",
           "WorkerView", "virtual_freeness", "worker_view"]

# Which request leaves a worker, for drain and balance; see migration_rules.rule_key.
RULES = ("shortest_first", "longest_first", "last_come_first")
REASONS = ("drain", "defrag", "priority", "balance", "manual")  # manual: an operator asked


@dataclass(frozen=True, slots=True)
class RequestView:
    """One running request on a worker, from the worker's load report."""

    request_id: str
    priority: int  # higher = more important
    num_blocks: int  # KV blocks it holds now
    arrival_time: float
    migrating: bool = False  # a migration of it is in flight: never pick it

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks} (request {self.request_id!r})")


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as the migration policy sees it."""

    worker_id: str
    healthy: bool
    draining: bool
    free_blocks: int
    total_blocks: int
    running: tuple[RequestView, ...]
    head_of_line_blocks: int = 0  # blocks the first waiting request needs; 0 if none wait
    head_of_line_priority: int = 0
    migrations_in: int = 0  # in flight now, into this worker
    migrations_out: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, str) or not self.worker_id:
            raise ValueError(f"worker_id must be a non-empty string, got {self.worker_id!r}")
        if not isinstance(self.running, tuple):
            raise ValueError(f"running must be a tuple, got {type(self.running).__name__} "
                             f"(worker {self.worker_id!r})")
        for name in ("free_blocks", "total_blocks", "head_of_line_blocks", "migrations_in", "migrations_out"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)} (worker {self.worker_id!r})")
        if self.free_blocks > self.total_blocks:
            raise ValueError(f"free_blocks ({self.free_blocks}) must be <= total_blocks ({self.total_blocks}) "
                             f"(worker {self.worker_id!r})")


def worker_view(load: "LoadReport", healthy: bool, draining: bool, moving: AbstractSet[str],
                migrations_in: int, migrations_out: int) -> WorkerView:
    """A worker's load report as the policy sees it. `moving`: requests with a
    migration in flight anywhere. A draining worker moves its waiting requests too
    (without KV); elsewhere only running requests move, for the KV they hold. An
    engine that moves requests by replaying their tokens (vLLM's handover) cannot move
    those whose state is more than their tokens (structured output, n > 1): the
    policy never sees them."""
    draining = draining or load.draining
    requests = tuple(RequestView(r.request_id, r.priority, r.num_blocks, r.arrival_time,
                                 r.migrating or r.request_id in moving)
                     for r in load.requests if (r.running or draining) and (load.kv_migration or r.recomputable))
    return WorkerView(load.worker_id, healthy, draining, load.free_blocks, load.total_blocks, requests,
                      load.head_of_line_blocks, load.head_of_line_priority, migrations_in, migrations_out)


@dataclass(frozen=True, slots=True)
class MigrationOrder:
    request_id: str
    source: str  # worker id
    destination: str  # worker id
    reason: str  # one of REASONS

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"reason must be one of {list(REASONS)}, got {self.reason!r}")
        if self.source == self.destination:
            raise ValueError(f"source and destination must differ, both are {self.source!r}")


@dataclass(frozen=True)
class MigrationConfig:
    enabled: bool = False  # the load-driven rules (defrag, priority, balance); drain always works
    interval_s: float = 0.5  # pairing interval (the manager uses it)
    balance_threshold: float = 3.0  # freeness gap, in blocks per running request (Llumnix used 3)
    rule: str = "shortest_first"  # which request leaves; one of RULES
    max_in_per_worker: int = 1  # migrations in flight into one worker at once
    max_out_per_worker: int = 1
    high_priority: int = 1  # requests with priority >= this are "high"
    priority_headroom_blocks: int = 0  # kept free beside a high-priority request (0: priority rule off)
    reserve_blocks: int = 1  # a destination keeps this many blocks free after taking a request
    request_cooldown_s: float = 5.0  # a request this policy moved is not moved again for this long
    # The mechanism's (WorkerConfig.migration_pause_blocks): pre-copy stops, and the
    # request pauses for the last copy, once at most this many blocks are unsent.
    stage_threshold_blocks: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, got {self.enabled!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {list(RULES)}, got {self.rule!r}")
        for name, low in (("max_in_per_worker", 1), ("max_out_per_worker", 1), ("priority_headroom_blocks", 0),
                          ("reserve_blocks", 0), ("stage_threshold_blocks", 1)):
            _check_int(name, getattr(self, name), low)
        _check_int("high_priority", self.high_priority, None)
        for name, positive in (("interval_s", True), ("balance_threshold", False),
                               ("request_cooldown_s", False)):
            _check_number(name, getattr(self, name), positive)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MigrationConfig":
        """From parsed YAML/JSON: unknown keys fail with the list of known ones."""
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"unknown migration settings {unknown}; known: {known}")
        return cls(**raw)


def _check_int(name: str, value: Any, low: int | None) -> None:
    # bool is an int to Python, but `max_in_per_worker: true` in YAML is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def virtual_freeness(view: WorkerView, config: MigrationConfig) -> float:
    """Free blocks per running request, counting virtual usage:

        (free_blocks - head_of_line_blocks - headroom) / max(len(running), 1)

    where headroom is priority_headroom_blocks if the worker runs a request with priority
    >= high_priority, else 0. A draining worker's is -inf: it must empty."""
    if view.draining:
        return -math.inf
    return _freeness(view.free_blocks, view.head_of_line_blocks, view.running, config)


class MigrationPolicy:
    """Plans migrations from one snapshot of the workers. Keeps only the requests it
    ordered within the last request_cooldown_s, so that a request does not ping-pong
    between two workers whose freeness keeps crossing."""

    def __init__(self, config: MigrationConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._moved_at: dict[str, float] = {}  # request id -> when this policy ordered it

    def __len__(self) -> int:
        """Requests remembered as cooling down (bounded by what one cooldown moves)."""
        return len(self._moved_at)

    def has_work(self, any_draining: bool) -> bool:
        """Whether plan() can order anything: with migration off it orders only drains,
        so a caller need not build the views of every worker for it."""
        return self.config.enabled or any_draining

    def plan(self, workers: Sequence[WorkerView]) -> list[MigrationOrder]:
        """The orders for this snapshot, in the order they were made: drain's first, then
        defrag's, priority's, balance's. Only drain's when migration is disabled."""
        ids = [w.worker_id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique, got {sorted(ids)}")
        now = self._clock()
        # Forget what can no longer block: the map stays bounded by one cooldown's moves.
        cooldown = self.config.request_cooldown_s
        self._moved_at = {rid: t for rid, t in self._moved_at.items() if now - t < cooldown}
        plan = Plan(workers, self.config, blocked=set(self._moved_at))
        orders = [MigrationOrder(rid, src, dst, reason) for rid, src, dst, reason in plan_orders(plan)]
        for order in orders:
            self._moved_at[order.request_id] = now
        return orders
