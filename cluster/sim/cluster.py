"""A yard cluster on simulated time: the router, the manager and every worker, run by
the same control-plane code as the real one, against a trace.

  router   the load book and the choice of a worker (router/load_book.py: the P/D
           split, then the configured dispatch policy), load shedding and the
           max_model_len check, on snapshots refreshed every snapshot_interval_s;
  manager  load reports polled every load_poll_interval_s (workers/load_report.py),
           the migration policy every migration.interval_s (cluster/migration_policy.py),
           the pool scalers every scaling_interval_s (cluster/pool_scaling.py);
  workers  the engine's scheduler and block manager (cluster/sim/engine.py), stepping
           for the step-time model's durations; moves in cluster/sim/moves.py.

Nothing fails in a simulation (no worker dies) and one router replica serves.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import yaml

from cluster.config import SPLIT_ROLES, ClusterConfig
from cluster.migration_policy import MigrationPolicy, worker_view
from cluster.pool_scaling import AddWorkers, PoolScaler, pool_worker
from cluster.sim.engine import Produced, SimEngine
from cluster.sim.loop import EventLoop
from cluster.sim.moves import MoveSettings, Mover
from cluster.sim.results import RequestRecord, SimResult, WorkerSample
from cluster.sim.step_time import StepTimeModel
from cluster.sim.trace import TraceRequest
from cluster.sim.worker import SimWorker
from router.config import RouterConfig
from router.dispatch import DispatchRequest, NoWorkerAvailable
from router.load import WorkerLoad, worker_load
from router.load_book import LoadBook
from router.policies import make_policy
from workers.load_report import LoadReport, load_report

# Serve-config sections that do not change what the simulation does.
_IGNORED_SECTIONS = {"http", "grpc", "ingress", "replicas", "router_cpus", "max_ongoing_requests"}


@dataclass(frozen=True)
class SimOptions:
    seed: int = 0  # the dispatch policy's randomness (power_of_two)
    relay_s: float = 0.0  # router to worker, and a token back: added to arrivals and outputs
    worker_startup_s: float = 30.0  # a worker added by scaling serves after this long
    max_cached_hashes: int = 4096  # as WorkerConfig's: the hashes a load report carries
    # The simulation stops here even if requests remain (they count as unfinished): a
    # cluster that can never finish them (a livelock of preemptions, say) ends too.
    max_simulated_s: float = 7 * 24 * 3600.0
    # Decode-only stretches as one event (cluster/sim/decode_run.py): the same results,
    # except where an event falls exactly on a step's end, many times faster.
    decode_runs: bool = True

    def __post_init__(self) -> None:
        for name in ("relay_s", "worker_startup_s", "max_simulated_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


def load_sim_config(path: Optional[Path]) -> tuple[ClusterConfig, RouterConfig]:
    """The cluster and router sections of a serve config YAML (as `yard serve` takes)."""
    raw: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a serve config must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    unknown = sorted(set(raw) - {"cluster", "router"} - _IGNORED_SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown serve config sections {unknown}; known: "
                         f"{sorted({'cluster', 'router'} | _IGNORED_SECTIONS)}")
    cluster = ClusterConfig.from_dict(raw.get("cluster") or {})
    router_args = dict(raw.get("router") or {})
    router_args.setdefault("model", cluster.engine.model)
    router_args.setdefault("block_size", cluster.engine.block_size)
    return cluster, RouterConfig(cluster_name=cluster.name, **router_args)


class Simulation:
    def __init__(self, cluster: ClusterConfig, router: RouterConfig, timing: StepTimeModel,
                 trace: Sequence[TraceRequest], options: SimOptions = SimOptions()) -> None:
        if router.block_size != cluster.engine.block_size:
            raise ValueError(f"router block_size {router.block_size} differs from the engine's "
                             f"{cluster.engine.block_size}")
        self.cluster, self.router, self.timing, self.options = cluster, router, timing, options
        self.loop = EventLoop()
        self.policy = make_policy(router.policy, rng=random.Random(options.seed), clock=self.loop.clock,
                                  **router.policy_arguments())
        self.book = LoadBook()
        self.reports: dict[str, LoadReport] = {}  # the manager's last poll of each worker
        # The same as a router reads it (worker_load), made once per poll rather than per refresh.
        self.snapshot: dict[str, WorkerLoad] = {}
        self.workers: dict[str, SimWorker] = {}
        self.retired: dict[str, dict[str, Any]] = {}  # workers drained away by scaling
        self._ids = itertools.count()
        for pool, count in cluster.pool_sizes():
            for _ in range(count):
                self._add_worker(pool, ready_at=0.0)
        self.migration_policy = MigrationPolicy(cluster.migration, self.loop.clock)
        self.mover = Mover(self.loop, timing, MoveSettings(cluster.migration.stage_threshold_blocks,
                                                           handoff_wait_s=cluster.handoff_wait_s,
                                                           handoff_streaming=cluster.handoff_streaming),
                           self._moved)
        self.scalers = {role: PoolScaler(role, pool.scaling, pool.num_workers, self.loop.clock)
                        for role, pool in cluster.pools.items() if role in SPLIT_ROLES}
        self.scaling: list[str] = []
        self.trace = sorted(trace, key=lambda r: (r.arrival_s, r.index))
        self.records = {r.request_id: RequestRecord(r) for r in self.trace}
        if len(self.records) != len(self.trace):
            raise ValueError("trace request indexes must be unique")
        # Only prefix-aware dispatch and the P/D split read a report's cached hashes:
        # other runs skip collecting them, which changes no decision and saves the most time.
        reads_hashes = cluster.disaggregated or "prefix_aware" in (router.policy, router.policy_options.get("fallback"))
        self.max_cached_hashes = options.max_cached_hashes if reads_hashes else 0
        self.samples: list[WorkerSample] = []
        self._polled_since_refresh = False
        self.unfinished = len(self.trace)
        # The longest sequence every worker can run, as the router learns it from the
        # reports (the model's limit until the first poll).
        self.max_model_len = timing.max_position_embeddings

    # -- running ---------------------------------------------------------------------------
    def run(self) -> SimResult:
        started = time.perf_counter()
        self._poll()
        self._refresh()  # a router starts serving once it has a snapshot
        arrivals = iter(self.trace)
        self._arrive_next(arrivals)
        self._every(self.cluster.load_poll_interval_s, self._poll)
        self._every(self.router.snapshot_interval_s, self._refresh)
        # Drain runs even with migration off: a pool that shrinks drains a worker.
        self._every(self.cluster.migration.interval_s, self._plan_migrations)
        if any(s.scales for s in self.scalers.values()):
            self._every(self.cluster.scaling_interval_s, self._scale)
        with cyclic_gc_paused():
            self.loop.run(until=self.options.max_simulated_s)
        for w in self.workers.values():  # requests cut off by the time limit: their tokens so far
            for entry in w.engine.requests.values():
                self.records[entry.seq.request_id].output_tokens = entry.seq.num_output_tokens
        workers = {**self.retired, **{wid: self._worker_totals(w) for wid, w in self.workers.items()}}
        return SimResult(list(self.records.values()), self.mover.records, self.samples, self.loop.now,
                         self.loop.events_run, time.perf_counter() - started, dict(sorted(workers.items())),
                         self.scaling)

    def migrate_at(self, time_s: float, request_id: str, source_id: str, destination_id: str) -> None:
        """Order a migration at a given time, as an operator would (the manager's migrate)."""
        def order() -> None:
            self.mover.migrate(request_id, self.workers[source_id], self.workers[destination_id], "manual")
        self.loop.at(time_s, order)

    def _every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """fn every interval_s while a request is unfinished (or still to come)."""
        def tick() -> None:
            if self.unfinished:
                fn()
                self.loop.after(interval_s, tick)
        self.loop.after(interval_s, tick)

    def _arrive_next(self, arrivals: Any) -> None:
        request = next(arrivals, None)
        if request is not None:
            self.loop.at(max(request.arrival_s, self.loop.now), self._arrive, request, arrivals)

    # -- the router ------------------------------------------------------------------------
    def _arrive(self, request: TraceRequest, arrivals: Any) -> None:
        self._arrive_next(arrivals)
        record = self.records[request.request_id]
        if self.book.saturated(self.router.max_queue_per_worker):
            return self._refuse(record, "shed")
        max_len = self.max_model_len
        if request.prompt_tokens >= max_len:
            return self._refuse(record, "too_long")
        prompt = request.prompt_token_ids()
        try:
            placement = self.book.place(DispatchRequest(request.request_id, tuple(prompt)), self.policy,
                                        self.router.block_size, self.router.decider_max_uncached_tokens)
        except NoWorkerAvailable:
            return self._refuse(record, "no_worker")
        worker = self.workers[placement.worker_id]
        self.book.dispatched(worker.worker_id, len(prompt))
        record.workers.append(worker.worker_id)
        max_tokens = min(request.output_tokens, max_len - request.prompt_tokens)
        self.loop.after(self.options.relay_s, self._admit, worker, request, prompt, max_tokens, placement.handoff_to)

    def _admit(self, worker: SimWorker, request: TraceRequest, prompt: list[int], max_tokens: int,
               handoff_to: Optional[str]) -> None:
        """The request reaches its worker (a prefill worker starts its handoff then)."""
        worker.post(lambda: worker.engine.add(request.request_id, prompt, max_tokens, 0, request.arrival_s))
        decode = self.workers.get(handoff_to) if handoff_to is not None else None
        if decode is not None:
            self.mover.hand_off(request.request_id, worker, decode)

    def _refuse(self, record: RequestRecord, status: str) -> None:
        record.status = status
        self.unfinished -= 1

    def _produced(self, worker: SimWorker, produced: list[Produced]) -> None:
        seen = self.loop.now + self.options.relay_s
        for p in produced:
            record = self.records[p.request_id]
            record.output_tokens = p.index + 1
            if record.first_token_s is None:
                record.first_token_s = seen
            if p.index == 0 and not p.finished:
                self.mover.first_token(p.request_id)
            if p.finished:
                record.finished_s = seen
                record.status = "ok"
                self.unfinished -= 1
                for wid in record.workers:
                    self.book.finished(wid)

    def _moved(self, request_id: str, source_id: str, destination_id: str) -> None:
        """The router follows a move to its destination, where the request now counts."""
        self.records[request_id].workers.append(destination_id)
        self.book.dispatched(destination_id)

    def _refresh(self) -> None:
        if self._polled_since_refresh:  # else the same snapshot again: refreshing it changes nothing
            self.book.refresh(dict(self.snapshot))
            self._polled_since_refresh = False

    # -- the manager -----------------------------------------------------------------------
    def _add_worker(self, pool: str, ready_at: float) -> SimWorker:
        worker_id = f"{self.cluster.name}-w{next(self._ids)}"
        engine = SimEngine(self.cluster.engine_for(pool), self.timing, self.loop.clock)
        worker = self.workers[worker_id] = SimWorker(worker_id, self.cluster.pool_role(pool), engine, self.loop, self._produced, ready_at,
                                                     self.options.decode_runs)
        return worker

    def _poll(self) -> None:
        self._poll_workers()
        self._polled_since_refresh = True
        limits = [r.max_model_len for r in self.reports.values() if r.max_model_len]
        if limits:
            self.max_model_len = min(limits)

    def _poll_workers(self) -> None:
        now = self.loop.now
        for wid, w in list(self.workers.items()):
            if w.booting:
                continue
            if w.draining and w.idle and not w.migrating_out and not w.migrations_in:
                self._retire(w)
                continue
            report = load_report(w.engine, wid, w.role, self.max_cached_hashes, w.draining,
                                 frozenset(w.migrating_out), w.migrations_in, now=now)
            self.reports[wid] = report
            self.snapshot[wid] = worker_load(report)
            self.samples.append(WorkerSample(now, wid, w.role, report.total_blocks - report.free_blocks,
                                             report.total_blocks, report.num_running, report.num_waiting))

    def _retire(self, worker: SimWorker) -> None:
        del self.workers[worker.worker_id]
        self.reports.pop(worker.worker_id, None)
        self.snapshot.pop(worker.worker_id, None)
        self.retired[worker.worker_id] = self._worker_totals(worker)
        self.scaling.append(f"{self.loop.now:.3f} {worker.role}: removed {worker.worker_id}")

    def _plan_migrations(self) -> None:
        if not self.migration_policy.has_work(any(w.draining for w in self.workers.values())):
            return
        # Prefill workers hand their requests off themselves: the policy leaves them out.
        flights = [m for m in self.mover.in_flight.values() if m.reason != "handoff"]
        moving = {m.request_id for m in flights}
        views = [worker_view(self.reports[wid], True, w.draining, moving,
                             sum(m.dest is w for m in flights), sum(m.source is w for m in flights))
                 for wid, w in self.workers.items() if wid in self.reports and not w.booting and w.role != "prefill"]
        for order in self.migration_policy.plan(views):
            self.mover.migrate(order.request_id, self.workers[order.source], self.workers[order.destination],
                               order.reason)

    def _scale(self) -> None:
        for role, scaler in self.scalers.items():
            if not scaler.scales:
                continue
            pool = [pool_worker(wid, None if w.booting else self.reports.get(wid))
                    for wid, w in self.workers.items() if w.role == role and not w.draining]
            decision = scaler.decide(pool)
            if decision is None:
                continue
            self.scaling.append(f"{self.loop.now:.3f} {role}: {decision}")
            if isinstance(decision, AddWorkers):
                for _ in range(decision.count):
                    self._add_worker(role, ready_at=self.loop.now + self.options.worker_startup_s)
            else:
                self.workers[decision.worker_id].draining = True

    @staticmethod
    def _worker_totals(w: SimWorker) -> dict[str, Any]:
        e = w.engine
        return {"role": w.role, "steps": e.num_steps, "busy_s": e.busy_s,
                "preemptions": e.scheduler.num_preemptions, "migrated_in": e.migrated_in,
                "migrated_out": e.migrated_out, "total_blocks": e.blocks.num_blocks}


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cycle collector off for the run. A simulation holds millions of live
    objects (every worker's block table, every request's record), which each full
    collection walks: at 1,000 workers that was 40% of the run. The simulation makes
    almost no reference cycles (at most 21 objects in a run of 60,000 requests), so reference
    counting alone frees its memory."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # Everything the run made goes to the oldest generation: re-enabled, the
        # collector would otherwise walk all of it at once (seconds at a million
        # requests), as the youngest.
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()
