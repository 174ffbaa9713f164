"""The four migration rules, applied in precedence to a working copy of the workers.

plan_orders() runs drain, defrag, priority and balance on one Plan. Each order updates
the copy at once (the source gains the request's blocks as free, the destination loses
them and runs the request), so later orders of the same plan see the earlier ones. The
types and config live in cluster/migration_policy.py; this module reads them only by
attribute, so that the two do not import each other.

Invariants a plan keeps: a request is ordered at most once; no worker sends more than
max_out_per_worker or receives more than max_in_per_worker migrations at once, counting
those in flight; a destination keeps reserve_blocks free beyond its head-of-line demand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:
    from cluster.migration_policy import MigrationConfig, RequestView, WorkerView

# (request_id, source, destination, reason); migration_policy wraps it in a MigrationOrder.
Order = tuple[str, str, str, str]


def virtual_freeness(free_blocks: int, head_of_line_blocks: int, running: Iterable[RequestView],
                     config: MigrationConfig) -> float:
    """Free blocks per running request after the head-of-line demand and, where a
    high-priority request runs, the priority headroom."""
    running = list(running)
    headroom = config.priority_headroom_blocks if runs_high(running, config) else 0
    return (free_blocks - head_of_line_blocks - headroom) / max(len(running), 1)


def runs_high(running: Iterable[RequestView], config: MigrationConfig) -> bool:
    return any(r.priority >= config.high_priority for r in running)


def rule_key(request: RequestView, rule: str) -> tuple[float, str]:
    """Sort key: the request that leaves first comes first. shortest_first moves the
    fewest blocks (quickest to copy); longest_first frees the most at once;
    last_come_first moves the request that has run the least."""
    if rule == "shortest_first":
        return (request.num_blocks, request.request_id)
    if rule == "longest_first":
        return (-request.num_blocks, request.request_id)
    assert rule == "last_come_first", rule  # MigrationConfig validates the name
    return (-request.arrival_time, request.request_id)


@dataclass(slots=True)
class Worker:
    """A healthy worker's working copy during one plan."""

    view: WorkerView  # the snapshot: id, total blocks, head of line, draining
    free_blocks: int
    running: list[RequestView]
    ins: int  # migrations into it: in flight plus ordered in this plan
    outs: int

    @property
    def worker_id(self) -> str:
        return self.view.worker_id

    def copy(self) -> "Worker":
        return Worker(self.view, self.free_blocks, list(self.running), self.ins, self.outs)


class Plan:
    """The working copy and the orders made so far. Unhealthy workers are left out: they
    are neither source nor destination."""

    def __init__(self, views: Sequence[WorkerView], config: MigrationConfig, blocked: set[str]) -> None:
        self.config = config
        self.workers = [Worker(v, v.free_blocks, list(v.running), v.migrations_in, v.migrations_out)
                        for v in sorted(views, key=lambda v: v.worker_id) if v.healthy]
        self.blocked = blocked  # request ids never to choose: cooling down, or ordered in this plan
        self.orders: list[Order] = []

    def freeness(self, w: Worker) -> float:
        if w.view.draining:
            return -math.inf
        return virtual_freeness(w.free_blocks, w.view.head_of_line_blocks, w.running, self.config)

    def movable(self, w: Worker) -> list[RequestView]:
        """Its requests that may be chosen, in the configured rule's order."""
        ok = (r for r in w.running if not r.migrating and r.request_id not in self.blocked)
        return sorted(ok, key=lambda r: rule_key(r, self.config.rule))

    def can_send(self, w: Worker) -> bool:
        return w.outs < self.config.max_out_per_worker

    def fits(self, dest: Worker, request: RequestView) -> bool:
        room = dest.free_blocks - dest.view.head_of_line_blocks - request.num_blocks
        return room >= self.config.reserve_blocks

    def destination(self, source: Worker, request: RequestView, avoid_high: bool = False) -> Optional[Worker]:
        """The freest worker that may take `request` now: healthy, not draining, under its
        in-cap, room for it; with avoid_high, running no high-priority request."""
        ok = [w for w in self.workers
              if w is not source and not w.view.draining and w.ins < self.config.max_in_per_worker
              and self.fits(w, request) and not (avoid_high and runs_high(w.running, self.config))]
        return min(ok, key=lambda w: (-self.freeness(w), w.worker_id), default=None)

    def move(self, request: RequestView, source: Worker, dest: Worker, reason: str) -> None:
        source.running = [r for r in source.running if r is not request]
        source.free_blocks += request.num_blocks
        source.outs += 1
        dest.running.append(request)
        dest.free_blocks -= request.num_blocks
        dest.ins += 1
        self.blocked.add(request.request_id)
        self.orders.append((request.request_id, source.worker_id, dest.worker_id, reason))

    def save(self) -> tuple[list[Worker], int, set[str]]:
        return [w.copy() for w in self.workers], len(self.orders), set(self.blocked)

    def restore(self, saved: tuple[list[Worker], int, set[str]]) -> None:
        """Undo the orders made since save(). The Worker objects stay the same ones, so
        that callers holding them see the restored state."""
        copies, n, blocked = saved
        for w, c in zip(self.workers, copies):
            w.free_blocks, w.running, w.ins, w.outs = c.free_blocks, c.running, c.ins, c.outs
        del self.orders[n:]
        self.blocked.clear()
        self.blocked.update(blocked)


def plan_orders(plan: Plan) -> list[Order]:
    """Drain always runs (an operator asked for it); the load-driven rules only when
    migration is enabled."""
    drain(plan)
    if not plan.config.enabled:
        return plan.orders
    defrag(plan)
    if plan.config.priority_headroom_blocks > 0:
        priority(plan)
    balance(plan)
    return plan.orders


def drain(plan: Plan) -> None:
    """Every request of a draining worker, in rule order, to the freest worker it fits,
    until the worker's out-cap. One that fits nowhere is skipped: a smaller one may."""
    for source in [w for w in plan.workers if w.view.draining]:
        for request in plan.movable(source):
            if not plan.can_send(source):
                break
            dest = plan.destination(source, request)
            if dest is not None:
                plan.move(request, source, dest, "drain")


def defrag(plan: Plan) -> None:
    """A worker whose head-of-line request does not fit its free blocks (but would fit
    its total) moves out running requests of no higher priority, largest first, until it
    does. All or nothing: a partial move would cost copies and still leave it stuck."""
    for source in plan.workers:
        view = source.view
        if view.draining or not source.free_blocks < view.head_of_line_blocks <= view.total_blocks:
            continue
        saved = plan.save()
        if not _cover_deficit(plan, source):
            plan.restore(saved)


def _cover_deficit(plan: Plan, source: Worker) -> bool:
    need, ceiling = source.view.head_of_line_blocks, source.view.head_of_line_priority
    candidates = sorted((r for r in plan.movable(source) if r.priority <= ceiling),
                        key=lambda r: (-r.num_blocks, r.request_id))
    for request in candidates:
        if source.free_blocks >= need:
            break
        if not plan.can_send(source):
            return False
        dest = plan.destination(source, request)
        if dest is not None:
            plan.move(request, source, dest, "defrag")
    return source.free_blocks >= need


def priority(plan: Plan) -> None:
    """A worker running a high-priority request with fewer than priority_headroom_blocks
    free moves out its other requests, lowest priority first, then in rule order, to
    workers running no high-priority request, until the headroom is met or caps stop it."""
    config = plan.config
    for source in plan.workers:
        if source.view.draining or not runs_high(source.running, config):
            continue
        low = sorted((r for r in plan.movable(source) if r.priority < config.high_priority),
                     key=lambda r: r.priority)  # stable: rule order within a priority
        for request in low:
            if source.free_blocks >= config.priority_headroom_blocks or not plan.can_send(source):
                break
            dest = plan.destination(source, request, avoid_high=True)
            if dest is not None:
                plan.move(request, source, dest, "priority")


def balance(plan: Plan) -> None:
    """Pair the least free worker with the freest while their freeness differs by more
    than balance_threshold, one request per step, recomputing after each."""
    config = plan.config
    exhausted: set[str] = set()  # sources with no feasible move left in this plan
    while True:
        pool = [w for w in plan.workers if not w.view.draining]  # drain has handled those
        # One request is not balanced away: moving it changes where the load is, not how much.
        sources = [w for w in pool if w.worker_id not in exhausted and plan.can_send(w) and len(w.running) > 1]
        source = min(sources, key=lambda w: (plan.freeness(w), w.worker_id), default=None)
        if source is None:
            return
        low = plan.freeness(source)
        dests = sorted((w for w in pool if w is not source and w.ins < config.max_in_per_worker
                        and plan.freeness(w) - low > config.balance_threshold),
                       key=lambda w: (-plan.freeness(w), w.worker_id))
        if not dests:
            return  # every other source is freer, so no pair passes the threshold
        if not _balance_step(plan, source, dests):
            exhausted.add(source.worker_id)


def _balance_step(plan: Plan, source: Worker, dests: list[Worker]) -> bool:
    """Move the first request in rule order that fits the freest destination possible
    without overshoot: afterwards the destination must not be less free than the source."""
    for dest in dests:
        for request in plan.movable(source):
            if plan.fits(dest, request) and not _overshoots(plan, request, source, dest):
                plan.move(request, source, dest, "balance")
                return True
    return False


def _overshoots(plan: Plan, request: RequestView, source: Worker, dest: Worker) -> bool:
    config = plan.config
    source_after = virtual_freeness(source.free_blocks + request.num_blocks, source.view.head_of_line_blocks,
                                    (r for r in source.running if r is not request), config)
    dest_after = virtual_freeness(dest.free_blocks - request.num_blocks, dest.view.head_of_line_blocks,
                                  [*dest.running, request], config)
    return dest_after < source_after
