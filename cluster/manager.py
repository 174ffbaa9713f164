"""The cluster manager: one named, detached Ray actor that owns the worker registry.

It creates the workers the config asks for, each in a placement group of its own
(bundle 0 for the worker actor, which is tensor-parallel rank 0, one more bundle per
further rank), polls each one's load report (that poll
is also the health check: a worker that does not answer within the timeout, or
whose actor died, is unhealthy), replaces dead workers under a new id, and serves
snapshots of the registry that router replicas pull.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig
from cluster.metrics import ClusterMetrics
from workers.load_report import LoadReport
from workers.worker import Worker, WorkerConfig


@dataclass(slots=True)
class WorkerEntry:
    worker_id: str
    handle: Any  # the Worker actor handle
    role: str
    placement: Optional[PlacementGroup] = None  # the worker's and its TP ranks' bundles
    healthy: bool = False  # until its first load report arrives
    load: Optional[LoadReport] = None
    failures: int = 0
    created_at: float = field(default_factory=time.monotonic)
    # The first load report, asked for at creation: until it arrives the worker is
    # starting (importing, loading weights), which is not a failure.
    booting: Optional[Any] = None


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    worker_id: str
    handle: Any
    role: str
    healthy: bool
    load: Optional[LoadReport]


_BOOTING = object()  # a poll result: the worker has not finished starting


class ClusterManager:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.workers: dict[str, WorkerEntry] = {}
        self._ids = itertools.count()
        self._replaced = 0
        self._metrics = ClusterMetrics(config.name, sum(count for _, count in config.pools()))
        for role, count in config.pools():
            for _ in range(count):
                self._start_worker(role)
        self._loop_task: Optional[asyncio.Task] = None

    def _start_worker(self, role: str) -> WorkerEntry:
        worker_id = f"{self.config.name}-w{next(self._ids)}"
        wc = WorkerConfig(worker_id=worker_id, engine=self.config.engine, role=role,
                          stream_interval_s=self.config.stream_interval_s)
        bundles = self.config.worker_bundles()
        placement = placement_group(bundles, strategy=self.config.engine.placement_strategy,
                                    name=f"yard-{worker_id}")
        handle = ray.remote(Worker).options(
            num_cpus=bundles[0]["CPU"], num_gpus=bundles[0].get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=0),
            name=f"yard-{worker_id}", lifetime=None).remote(wc)
        entry = WorkerEntry(worker_id, handle, role, placement, booting=handle.load.remote())
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
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._poll_forever())
        return sum(w.healthy for w in self.workers.values())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_poll_interval_s)
            await self.poll_once()

    async def poll_once(self) -> None:
        entries = list(self.workers.values())
        results = await asyncio.gather(*(self._poll(e) for e in entries))
        for entry, report in zip(entries, results):
            if report is _BOOTING:
                continue
            if report is not None:
                entry.load, entry.healthy, entry.failures = report, report.healthy, 0
                continue
            entry.healthy = False
            entry.failures += 1
            if entry.failures >= self.config.failures_before_replace:
                self._replace(entry)
        self._metrics.states(self._state_counts())

    def _state_counts(self) -> dict[str, int]:
        states = ["booting" if e.booting is not None else "healthy" if e.healthy else "unhealthy"
                  for e in self.workers.values()]
        return {state: states.count(state) for state in set(states)}

    async def _poll(self, entry: WorkerEntry) -> Any:
        """The worker's load report; None if it failed; _BOOTING while it starts."""
        if entry.booting is not None:
            return self._boot_status(entry)
        try:
            return await asyncio.wait_for(entry.handle.load.remote(), self.config.health_timeout_s)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
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
        return report

    def _replace(self, entry: WorkerEntry) -> None:
        del self.workers[entry.worker_id]
        _remove(entry)
        self._replaced += 1
        self._metrics.replaced()
        self._start_worker(entry.role)

    async def report_failure(self, worker_id: str) -> None:
        """A router saw a worker's stream break: check it now rather than next poll."""
        if worker_id in self.workers:
            self.workers[worker_id].healthy = False
            await self.poll_once()

    def snapshot(self) -> list[WorkerSnapshot]:
        return [WorkerSnapshot(e.worker_id, e.handle, e.role, e.healthy, e.load) for e in self.workers.values()]

    def status(self) -> dict[str, Any]:
        return {"cluster": self.config.name, "replaced": self._replaced,
                "workers": [{"id": e.worker_id, "role": e.role, "healthy": e.healthy,
                             "running": e.load.num_running if e.load else None,
                             "waiting": e.load.num_waiting if e.load else None,
                             "free_blocks": e.load.free_blocks if e.load else None,
                             "total_blocks": e.load.total_blocks if e.load else None}
                            for e in self.workers.values()]}

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
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
