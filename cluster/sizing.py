"""Fit a serve config to the Ray cluster it starts on, or say why it cannot fit.

`yard serve` asks Ray for CPUs: each worker actor (`worker_cpus`), each further
tensor-parallel rank (`engine.tp_cpus_per_rank`) and each router replica
(`router_cpus`). Asking for more than the cluster has leaves an actor pending
forever, so Serve would wait without a word. Here, before anything starts: a
`worker_cpus` the config does not set shrinks so that everything fits, and a demand
that cannot fit fails, naming what was asked and what there is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.config import engine_settings

DEFAULT_WORKER_CPUS = 1.0
DEFAULT_ROUTER_CPUS = 0.5
MIN_WORKER_CPUS = 0.1  # below this Ray still schedules, but a worker would crawl


@dataclass(frozen=True)
class WorkerGroup:
    """Workers of one pool, as the config asks for them."""

    pool: str  # "mixed" (num_workers), "prefill", "decode", or a further mixed pool's name
    workers: int
    worker_cpus: float
    tp_ranks_per_worker: int  # further ranks, besides the worker itself
    tp_cpus_per_rank: float
    own_cpus: bool  # its pool sets worker_cpus (else the cluster's, which fit may shrink)

    @property
    def total(self) -> float:
        return self.workers * (self.worker_cpus + self.tp_ranks_per_worker * self.tp_cpus_per_rank)

    def describe(self) -> str:
        tp = (f" + {self.tp_ranks_per_worker} tensor-parallel rank(s) x {self.tp_cpus_per_rank:g}"
              if self.tp_ranks_per_worker else "")
        pool = "" if self.pool == "mixed" else f"{self.pool} "
        return f"{self.workers} {pool}worker(s) x ({self.worker_cpus:g}{tp}) CPUs"


@dataclass(frozen=True)
class Demand:
    groups: tuple[WorkerGroup, ...]
    replicas: int
    router_cpus: float

    @property
    def total(self) -> float:
        return sum(g.total for g in self.groups) + self.replicas * self.router_cpus

    def describe(self) -> str:
        return (f"{', '.join(g.describe() for g in self.groups)} and {self.replicas} router "
                f"replica(s) x {self.router_cpus:g} CPUs = {self.total:g} CPUs")


def demand_of(args: dict[str, Any]) -> Demand:
    """What a build_app args dict (values file merged) asks Ray for."""
    cluster = args.get("cluster") or {}
    engine = engine_settings(cluster.get("engine"))
    worker_cpus = float(cluster.get("worker_cpus", DEFAULT_WORKER_CPUS))

    def group(name: str, workers: int, pool: dict[str, Any]) -> WorkerGroup:
        pool_engine = {**engine, **engine_settings(pool.get("engine"))}
        return WorkerGroup(name, workers, float(pool.get("worker_cpus", worker_cpus)),
                           int(pool_engine.get("tensor_parallel_size", 1)) - 1,
                           float(pool_engine.get("tp_cpus_per_rank", 1.0)), "worker_cpus" in pool)

    pools = cluster.get("pools") or {}
    mixed = int(cluster.get("num_workers", 0 if pools else 2))
    groups = ([group("mixed", mixed, {})] if mixed else []) + [
        group(name, int((pool or {}).get("num_workers", 1)), pool or {}) for name, pool in pools.items()]
    return Demand(tuple(groups), replicas=int(args.get("replicas", 1)),
                  router_cpus=float(args.get("router_cpus", DEFAULT_ROUTER_CPUS)))


def fit(args: dict[str, Any], cluster_cpus: float) -> dict[str, Any]:
    """args with worker_cpus sized to the cluster when the config leaves it unset;
    raises ValueError when the demand cannot fit."""
    demand = demand_of(args)
    shrinkable = [g for g in demand.groups if not g.own_cpus]
    if "worker_cpus" not in (args.get("cluster") or {}) and demand.total > cluster_cpus and shrinkable:
        workers = sum(g.workers for g in shrinkable)
        spare = cluster_cpus - (demand.total - sum(g.workers * g.worker_cpus for g in shrinkable))
        worker_cpus = round(min(DEFAULT_WORKER_CPUS, spare / workers), 2)
        if worker_cpus >= MIN_WORKER_CPUS:
            args = {**args, "cluster": {**args.get("cluster", {}), "worker_cpus": worker_cpus}}
            demand = demand_of(args)
    if demand.total > cluster_cpus:
        raise ValueError(f"this deployment asks Ray for {demand.describe()}, but the cluster has "
                         f"{cluster_cpus:g} CPUs: lower cluster.worker_cpus, cluster.num_workers, pool sizes, "
                         f"replicas or router_cpus, or add nodes")
    return args
