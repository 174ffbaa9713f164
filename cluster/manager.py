"""The cluster manager: one named, detached Ray actor that owns the worker registry.

It creates the workers the config asks for, each in a placement group of its own
(bundle 0 for the worker actor, which is tensor-parallel rank 0, one more bundle per
further rank), polls each one's load report (that poll
is also the health check: a worker that does not answer within the timeout, or
whose actor died, is unhealthy), replaces dead workers under a new id, and serves
snapshots of the registry that router replicas pull. Every migration interval it
asks the migration policy (cluster/migration_policy.py) which requests to move and
tells their source workers; it drains workers on request. Prefill and decode pools
that may scale are resized apart (cluster/pool_scaling.py): a worker is added by
raising the pool's size, and removed by draining it first.

The workers and their placement groups are detached: they outlive the manager. When
the manager dies, Ray restarts it (the actor has unlimited restarts), and the new
one adopts the workers that still run (cluster/adoption.py) instead of starting new
ones; routers serve on their last snapshot meanwhile. A manager that Ray did not
restart (a fresh deploy after one was killed for good) removes such orphans instead:
it cannot know what settings they were started with.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.adoption import Orphans, find_orphans, placement_name, remove_orphans
from cluster.config import SPLIT_ROLES, ClusterConfig
from cluster.departures import Departures
from cluster.metrics import ClusterMetrics
from cluster.migration_policy import MigrationOrder, MigrationPolicy, WorkerView, worker_view
from cluster.pool_scaling import AddWorkers, Decision, PoolScaler, PoolWorker, pool_worker
from cluster.recompute_drain import DrainCandidate, recompute_drain_orders
from router.config import MANAGER_NAMESPACE
from workers.events import worker_actor_name
from workers.load_report import LoadReport
from workers.migration import MigrationOrder as WorkerMigrationOrder
from workers.migration import MigrationResult
from workers.worker import Worker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerEntry:
    worker_id: str
    handle: Any  # the Worker actor handle
    role: Optional[str]  # None: adopted, until its first load report says
    placement: Optional[PlacementGroup] = None  # the worker's and its TP ranks' bundles
    healthy: bool = False  # until its first load report arrives
    load: Optional[LoadReport] = None
    failures: int = 0
    created_at: float = field(default_factory=time.monotonic)
    # The first load report, asked for at creation: until it arrives the worker is
    # starting (importing, loading weights), which is not a failure.
    booting: Optional[Any] = None
    draining: bool = False
    pool: Optional[str] = None  # its pool's name (ClusterConfig.pools); None like role, when adopted


@dataclass(frozen=True, slots=True)
class InFlight:
    """A migration the manager ordered and the source is running."""

    migration_id: str
    order: MigrationOrder
    started_at: float


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    worker_id: str
    handle: Any
    role: Optional[str]  # None: adopted, not yet reported
    healthy: bool
    load: Optional[LoadReport]


_BOOTING = object()  # a poll result: the worker has not finished starting


class ClusterManager:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.workers: dict[str, WorkerEntry] = {}
        self._sizes = dict(config.pool_sizes())  # workers each pool should have now, by pool name
        self._scalers = {role: PoolScaler(role, pool.scaling, pool.num_workers, time.monotonic)
                         for role, pool in config.pools.items() if role in SPLIT_ROLES}
        self._retiring: set[str] = set()  # workers drained to shrink their pool
        self._scaling_task: Optional[asyncio.Task] = None
        self._replaced = 0
        self._metrics = ClusterMetrics(config.name)
        orphans = find_orphans(config.name)
        self._ids = itertools.count(orphans.next_index)  # ids are never reused, across managers
        with warnings.catch_warnings():  # Ray warns about an actor_id it reads inside
            warnings.simplefilter("ignore")
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._adopting = self.restarted  # until the adopted workers have said their roles
        if self.restarted:
            self._adopt(orphans)
        else:
            remove_orphans(orphans)
        self._top_up()
        self._loop_task: Optional[asyncio.Task] = None
        self._polling: Optional[asyncio.Future] = None  # the poll running now, shared by its callers
        self._migration_task: Optional[asyncio.Task] = None
        self._policy = MigrationPolicy(config.migration, time.monotonic)
        self._migration_ids = itertools.count()
        self._in_flight: dict[str, InFlight] = {}
        self._departures = Departures()  # committed moves that the sources' reports do not show yet
        self._migration_tasks: set[asyncio.Task] = set()
        self._migration_totals: collections.Counter[tuple[str, str]] = collections.Counter()  # (reason, outcome)
        self._recent_migrations: collections.deque[MigrationResult] = collections.deque(maxlen=32)

    def _adopt(self, orphans: Orphans) -> None:
        """Take over the workers a previous incarnation started; their role and pool
        are known from their first load report, as a booting worker's are."""
        for worker_id, (handle, placement) in orphans.workers.items():
            self.workers[worker_id] = WorkerEntry(worker_id, handle, None, placement, booting=handle.load.remote())
            log.warning("manager restarted: adopting worker %s", worker_id)
        remove_orphans(dataclasses.replace(orphans, workers={}))  # groups whose worker is gone

    def _top_up(self) -> None:
        """Start the workers each pool lacks (at start, and after one was removed).
        While an adopted worker has not said its pool, wait: it may fill one."""
        if any(e.pool is None for e in self.workers.values()):
            return
        if self._adopting:
            self._adopt_sizes()
        for pool, count in self._sizes.items():
            have = sum(e.pool == pool and e.worker_id not in self._retiring for e in self.workers.values())
            for _ in range(count - have):
                self._start_worker(pool)

    def _adopt_sizes(self) -> None:
        """A pool its predecessor had scaled past the configured size keeps the
        workers it adopted: that is its size now (the scaler goes on from there)."""
        self._adopting = False
        for pool in self._sizes:
            adopted = sum(e.pool == pool for e in self.workers.values())
            self._sizes[pool] = max(self._sizes[pool], adopted)

    def _start_worker(self, pool: str) -> WorkerEntry:
        worker_id = f"{self.config.name}-w{next(self._ids)}"
        wc = self.config.worker_config(worker_id, pool)
        bundles = self.config.worker_bundles(pool)
        placement = placement_group(bundles, strategy=self.config.engine.placement_strategy,
                                    name=placement_name(worker_id), lifetime="detached")
        handle = ray.remote(Worker).options(
            num_cpus=bundles[0]["CPU"], num_gpus=bundles[0].get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=0),
            name=worker_actor_name(worker_id), namespace=MANAGER_NAMESPACE, lifetime="detached").remote(wc)
        entry = WorkerEntry(worker_id, handle, wc.role, placement, booting=handle.load.remote(), pool=pool)
        self.workers[worker_id] = entry
        return entry

    async def start(self) -> int:
        """Wait for the workers to start (up to startup_timeout_s), then begin polling;
        returns the number of healthy workers."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        await self.poll_once()
        while any(e.booting is not None for e in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await self.poll_once()
        self._ensure_loops()
        return sum(w.healthy for w in self.workers.values())

    def _ensure_loops(self) -> None:
        """Start polling and planning migrations, once. A manager that Ray restarted
        gets no start() call: the first router that pulls a snapshot starts them."""
        if self._loop_task is None:
            loop = asyncio.get_running_loop()
            self._loop_task = loop.create_task(self._poll_forever())
            self._migration_task = loop.create_task(self._migrate_forever())
            if any(s.scales for s in self._scalers.values()):
                self._scaling_task = loop.create_task(self._scale_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_poll_interval_s)
            try:
                await self.poll_once()
            except Exception as e:  # noqa: BLE001 - one bad poll must not stop polling for good
                log.warning("polling the workers failed: %s", e)

    async def poll_once(self) -> None:
        """Poll every worker once. Callers that come while a poll runs (the loop, and
        routers reporting a broken stream, often many at once) share it: a worker is
        counted once per poll, so one slow moment is not counted as many failures."""
        if self._polling is None or self._polling.done():
            self._polling = asyncio.ensure_future(self._poll_all())
        await asyncio.shield(self._polling)

    async def _poll_all(self) -> None:
        entries = list(self.workers.values())
        results = await asyncio.gather(*(self._poll(e) for e in entries))
        for entry, report in zip(entries, results):
            if report is _BOOTING or self.workers.get(entry.worker_id) is not entry:
                continue
            if report is not None:
                entry.load, entry.healthy = report, report.healthy
                if report.healthy:
                    entry.failures = 0
                    continue
            # No answer, or an answer that says it cannot serve (its engine failed):
            # either way it is replaced after failures_before_replace polls in a row.
            entry.healthy = False
            entry.failures += 1
            why = "no answer" if report is None else "reports unhealthy"
            log.warning("worker %s failed a poll (%s), %d in a row", entry.worker_id, why, entry.failures)
            if entry.failures >= self.config.failures_before_replace:
                log.warning("replacing worker %s", entry.worker_id)
                self._replace(entry)
        self._top_up()  # once adopted workers have said their roles
        self._metrics.states(self._state_counts(), len(self._in_flight), self._sizes)

    def _state_counts(self) -> dict[str, int]:
        states = ["booting" if e.booting is not None else "unhealthy" if not e.healthy
                  else "draining" if e.draining else "healthy" for e in self.workers.values()]
        return {state: states.count(state) for state in set(states)}

    async def _poll(self, entry: WorkerEntry) -> Any:
        """The worker's load report; None if it failed; _BOOTING while it starts."""
        if entry.booting is not None:
            return self._boot_status(entry)
        try:
            return await asyncio.wait_for(entry.handle.load.remote(), self.config.health_timeout_s)
        except (asyncio.TimeoutError, ray.exceptions.RayError) as e:
            log.warning("polling worker %s: %s", entry.worker_id,
                        f"no answer within {self.config.health_timeout_s:g} s" if isinstance(e, asyncio.TimeoutError)
                        else f"{type(e).__name__}: {str(e)[:200]}")
            return None

    def _boot_status(self, entry: WorkerEntry) -> Any:
        ready, _ = ray.wait([entry.booting], timeout=0)
        if not ready:
            started_long_ago = time.monotonic() - entry.created_at > self.config.startup_timeout_s
            return None if started_long_ago else _BOOTING
        try:
            report = ray.get(entry.booting)
        except ray.exceptions.RayError:
            return None
        entry.booting = None
        entry.role = entry.role or report.role  # an adopted worker's
        entry.pool = entry.pool or report.pool or report.role
        return report

    def _replace(self, entry: WorkerEntry) -> None:
        if self.workers.get(entry.worker_id) is not entry:
            return  # already replaced
        del self.workers[entry.worker_id]
        _remove(entry)
        self._replaced += 1
        self._metrics.replaced()
        self._top_up()

    # -- pools that scale ---------------------------------------------------------------
    async def _scale_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.scaling_interval_s)
            try:
                self.scale_pools()
            except Exception as e:  # noqa: BLE001 - a bad decision must not stop the loop
                log.warning("scaling the pools failed: %s", e)

    def scale_pools(self) -> list[Decision]:
        """Ask each pool's scaler for a change, and make it."""
        decisions = []
        for role, scaler in self._scalers.items():
            if not scaler.scales:
                continue
            decision = scaler.decide([self._pool_worker(e) for e in self.workers.values()
                                      if e.pool == role and not e.draining and e.worker_id not in self._retiring])
            if decision is not None:
                log.warning("pool %s: %s (%s)", role, decision, decision.why)
                self._apply(decision)
                decisions.append(decision)
        return decisions

    @staticmethod
    def _pool_worker(entry: WorkerEntry) -> PoolWorker:
        return pool_worker(entry.worker_id, None if entry.booting is not None else entry.load)

    def _apply(self, decision: Decision) -> None:
        if isinstance(decision, AddWorkers):
            self._sizes[decision.role] += decision.count
            self._top_up()
            return
        entry = self.workers.get(decision.worker_id)
        if entry is None:
            return
        self._sizes[decision.role] -= 1
        self._retiring.add(entry.worker_id)
        task = asyncio.get_running_loop().create_task(self._retire(entry))
        self._migration_tasks.add(task)
        task.add_done_callback(self._migration_tasks.discard)

    async def _retire(self, entry: WorkerEntry) -> None:
        """Drain a worker (its requests move out, or finish), then remove it. One that
        does not drain in time goes back to serving, and its pool keeps its size."""
        try:
            result = await self.drain(entry.worker_id, self.config.retire_timeout_s)
            if result["drained"] and self.workers.get(entry.worker_id) is entry:
                del self.workers[entry.worker_id]
                _remove(entry)
                return
            log.warning("worker %s did not drain (%s requests left): it serves on", entry.worker_id,
                        result["remaining"])
            entry.draining = False
            await entry.handle.set_draining.remote(False)
            self._sizes[entry.pool] += 1
        except Exception as e:  # noqa: BLE001 - it died meanwhile: the pool is topped up
            log.warning("retiring worker %s: %s", entry.worker_id, e)
            self._sizes[entry.pool] += 1
        finally:
            self._retiring.discard(entry.worker_id)
            self._top_up()

    async def report_failure(self, worker_id: str) -> None:
        """A router saw a worker's stream break: check it now rather than next poll."""
        if worker_id in self.workers:
            self.workers[worker_id].healthy = False
            await self.poll_once()

    # -- live migration ------------------------------------------------------------------
    async def _migrate_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.migration.interval_s)
            try:
                self.plan_migrations()
            except Exception as e:  # noqa: BLE001 - a bad plan must not stop the loop
                log.warning("planning migrations failed: %s", e)

    def plan_migrations(self) -> list[MigrationOrder]:
        """Ask the policy what to move now, and start those migrations."""
        if not self._policy.has_work(any(e.draining or (e.load is not None and e.load.draining)
                                         for e in self.workers.values())):
            return []
        moving = self._moving()
        orders = [order for views in self._kv_groups(moving).values() for order in self._policy.plan(views)]
        orders += self._recompute_drains(moving)
        for order in orders:
            self._launch(order)
        return orders

    def _moving(self) -> set[str]:
        """Requests no planner may order now: those moving, and those that have left a
        worker whose report still lists them (cluster/departures.py)."""
        gone = self._departures.gone({wid: e.load for wid, e in self.workers.items()})
        return {f.order.request_id for f in self._in_flight.values()} | gone

    def _kv_groups(self, moving: set[str]) -> dict[str, list[WorkerView]]:
        """The policy pairs workers only within a KV group (LoadReport.kv_group): yard's
        engines, or vLLM engines of one handover layout. Prefill workers hand their
        requests to decode workers themselves, and a worker without a group moves its
        requests by recompute: neither is in one. A draining vLLM worker is left to the
        recompute drain, which sends its requests to any engine, with KV where it can."""
        groups: dict[str, list[WorkerView]] = collections.defaultdict(list)
        for e in self.workers.values():
            if e.load is None or e.booting is not None or e.role == "prefill" or not e.load.kv_group:
                continue
            if not e.load.kv_migration and (e.draining or e.load.draining):
                continue
            groups[e.load.kv_group].append(self._view(e, moving))
        return groups

    def _recompute_drains(self, moving: set[str]) -> list[MigrationOrder]:
        """Draining workers that cannot move KV move their requests by recompute."""
        flights = [f.order for f in self._in_flight.values()]
        candidates = [DrainCandidate(e.load, e.healthy and e.booting is None and not e.draining and not e.load.draining
                                     and e.role == "mixed", e.draining or e.load.draining,
                                     sum(o.source == e.worker_id for o in flights),
                                     sum(o.destination == e.worker_id for o in flights))
                      for e in self.workers.values() if e.load is not None]
        return recompute_drain_orders(candidates, moving, self.config.migration)

    def _view(self, entry: WorkerEntry, moving: set[str]) -> WorkerView:
        flights = self._in_flight.values()
        return worker_view(entry.load, entry.healthy, entry.draining, moving,
                           sum(f.order.destination == entry.worker_id for f in flights),
                           sum(f.order.source == entry.worker_id for f in flights))

    def _launch(self, order: MigrationOrder) -> None:
        mid = f"{self.config.name}-m{next(self._migration_ids)}"
        self._in_flight[mid] = InFlight(mid, order, time.time())
        task = asyncio.get_running_loop().create_task(self._run_migration(mid, order))
        self._migration_tasks.add(task)
        task.add_done_callback(self._migration_tasks.discard)

    async def _run_migration(self, mid: str, order: MigrationOrder) -> MigrationResult:
        source, dest = self.workers.get(order.source), self.workers.get(order.destination)
        try:
            if source is None or dest is None:
                raise LookupError(f"worker {order.source if source is None else order.destination} is gone")
            result = await source.handle.migrate.remote(
                WorkerMigrationOrder(mid, order.request_id, order.destination, dest.handle, order.reason))
        except Exception as e:  # noqa: BLE001 - the source died: its requests fail over by recompute
            result = MigrationResult(mid, order.request_id, order.source, order.destination, order.reason, "failed",
                                     f"{type(e).__name__}: {e}")
        del self._in_flight[mid]
        if result.committed:
            self._departures.record(order.request_id, order.source, time.time())
        self._migration_totals[(result.reason, result.outcome)] += 1
        self._recent_migrations.append(result)
        self._metrics.migration_ended(result)
        return result

    async def migrate(self, request_id: str, source_id: str, destination_id: str) -> MigrationResult:
        """Move one request now (operators, tests); the policy's caps do not apply."""
        for wid in (source_id, destination_id):
            self._entry(wid)
        order = MigrationOrder(request_id, source_id, destination_id, "manual")
        mid = f"{self.config.name}-m{next(self._migration_ids)}"
        self._in_flight[mid] = InFlight(mid, order, time.time())
        return await self._run_migration(mid, order)

    async def drain(self, worker_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """Stop sending work to the worker, move every request out, and return once
        it holds none (or at the timeout, saying how many remain)."""
        entry = self._entry(worker_id)
        entry.draining = True
        await entry.handle.set_draining.remote(True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            report = await entry.handle.load.remote()
            busy = any(f.order.source == worker_id for f in self._in_flight.values())
            if report.num_running + report.num_waiting == 0 and not busy:
                return {"worker": worker_id, "drained": True, "remaining": 0}
            await asyncio.sleep(0.1)
        return {"worker": worker_id, "drained": False, "remaining": report.num_running + report.num_waiting}

    async def drain_node(self, node_ip: str, timeout_s: float = 300.0) -> list[dict[str, Any]]:
        """Drain every worker on a Ray node (a pod's preStop hook, before `ray stop`)."""
        on_node = [e.worker_id for e in self.workers.values() if e.load is not None and e.load.node_ip == node_ip]
        return list(await asyncio.gather(*(self.drain(wid, timeout_s) for wid in on_node)))

    def _entry(self, worker_id: str) -> WorkerEntry:
        entry = self.workers.get(worker_id)
        if entry is None:
            raise ValueError(f"no worker {worker_id!r} in cluster {self.config.name}; "
                             f"workers: {sorted(self.workers)}")
        return entry

    def get_config(self) -> ClusterConfig:
        return self.config

    async def snapshot(self) -> list[WorkerSnapshot]:
        self._ensure_loops()
        return [WorkerSnapshot(e.worker_id, e.handle, e.role, e.healthy, e.load) for e in self.workers.values()]

    async def snapshot_if_changed(self, seen: Optional[tuple] = None) -> tuple[tuple, Optional[list[WorkerSnapshot]]]:
        """(the snapshot's version, the snapshot), or (version, None) while the version
        is still `seen`. Routers pull every snapshot_interval_s (0.1 s), while the
        reports change every load_poll_interval_s: a snapshot carries every worker's
        requests and cached block hashes, and sending the same one again cost the
        manager and each router replica milliseconds per pull."""
        version = self._snapshot_version()
        return version, None if version == seen else await self.snapshot()

    def _snapshot_version(self) -> tuple:
        """Changes whenever what snapshot() returns may: a worker joins, leaves or is
        replaced (its entry's creation time), changes health or role, or reports."""
        return tuple((e.worker_id, e.created_at, e.role, e.healthy, e.load.reported_at if e.load else None)
                     for e in self.workers.values())

    async def status(self) -> dict[str, Any]:
        self._ensure_loops()
        return {"cluster": self.config.name, "replaced": self._replaced, "restarted": self.restarted,
                "pools": {pool: {"size": size, "min": s.min_workers, "max": s.max_workers}
                          if (s := self._scalers.get(pool)) else {"size": size} for pool, size in self._sizes.items()},
                "migrations": self._migration_status(),
                "workers": [{"id": e.worker_id, "role": e.role, "pool": e.pool, "healthy": e.healthy,
                             "draining": e.draining,
                             "running": e.load.num_running if e.load else None,
                             "waiting": e.load.num_waiting if e.load else None,
                             "free_blocks": e.load.free_blocks if e.load else None,
                             "total_blocks": e.load.total_blocks if e.load else None}
                            for e in self.workers.values()]}

    def _migration_status(self) -> dict[str, Any]:
        now = time.time()
        return {"in_flight": [{"id": f.migration_id, "request": f.order.request_id, "from": f.order.source,
                               "to": f.order.destination, "reason": f.order.reason,
                               "running_s": round(now - f.started_at, 3)} for f in self._in_flight.values()],
                "totals": [{"reason": reason, "outcome": outcome, "count": n}
                           for (reason, outcome), n in sorted(self._migration_totals.items())],
                "recent": [{"id": r.migration_id, "request": r.request_id, "from": r.source_id,
                            "to": r.destination_id, "reason": r.reason, "outcome": r.outcome, "error": r.error,
                            "stages": r.stages, "blocks": r.blocks, "paused_s": round(r.paused_s, 4)}
                           for r in self._recent_migrations]}

    async def shutdown(self) -> None:
        for task in (self._loop_task, self._migration_task, self._scaling_task, *self._migration_tasks):
            if task is not None:
                task.cancel()
        for entry in self.workers.values():
            try:
                await entry.handle.shutdown.remote()
            except ray.exceptions.RayError:
                pass
            _remove(entry)
        self.workers.clear()


def _remove(entry: WorkerEntry) -> None:
    """Kill the worker and free its bundles (its TP ranks die with the group)."""
    try:
        ray.kill(entry.handle)
    except ray.exceptions.RayError:
        pass  # already gone
    if entry.placement is not None:
        remove_placement_group(entry.placement)
