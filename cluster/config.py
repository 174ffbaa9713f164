"""The cluster tier's configuration: how many workers of which role, and how the
manager watches them. Validated where it is made; YAML is parsed only at the edge.

Workers come in pools: `num_workers` mixed workers (prefill and decode in one, the
pool named "mixed"), and under `pools:` optionally a `prefill` and a `decode` pool
(docs/disaggregation.md) and any number of further mixed pools under names of their
own (a pool of vLLM workers beside yard's, say: docs/vllm-backend.md). Each pool has
its own worker count, resources and engine settings over the cluster's."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from cluster.migration_policy import MigrationConfig
from cluster.pool_scaling import PoolScaling
from workers.engine.config import EngineConfig
from workers.worker_config import STREAM_UNITS, WorkerConfig


SPLIT_ROLES = ("prefill", "decode")
MIXED_POOL = "mixed"  # num_workers' pool
_POOL_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")  # it labels metrics and logs
# What the two sides of a prefill-to-decode handoff must share for the KV to fit.
KV_SETTINGS = ("model", "dtype", "block_size", "tensor_parallel_size")


@dataclass(frozen=True)
class PoolConfig:
    """One pool's workers; unset fields take the cluster's."""

    num_workers: int = 1  # at start; the pool then scales within scaling.min_workers and max_workers
    worker_cpus: Optional[float] = None
    gpus_per_rank: Optional[float] = None
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig settings over the cluster's
    scaling: PoolScaling = field(default_factory=PoolScaling)  # cluster/pool_scaling.py

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        self.scaling.bounds(self.num_workers)
        if self.worker_cpus is not None and not self.worker_cpus > 0:
            raise ValueError(f"worker_cpus must be > 0, got {self.worker_cpus!r}")
        if self.gpus_per_rank is not None and not self.gpus_per_rank >= 0:
            raise ValueError(f"gpus_per_rank must be >= 0, got {self.gpus_per_rank!r}")
        _check_keys("engine", self.engine, {f.name for f in fields(EngineConfig)})


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "yard"  # prefixes worker ids and actor names: two clusters need two names
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_workers: int = 2  # mixed-role workers (0 where prefill and decode pools serve)
    # "prefill" and "decode", both or neither; any other name is a further mixed pool.
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    worker_cpus: float = 1.0  # Ray CPUs each worker actor asks for
    gpus_per_rank: float = 0.0  # Ray GPUs of each tensor-parallel rank (the worker is rank 0)
    # Extra Ray resources each rank's bundle asks for: a label that keeps the model's
    # ranks on their node kind when attention workers run on another one.
    rank_resources: dict[str, float] = field(default_factory=dict)
    load_poll_interval_s: float = 0.5
    health_timeout_s: float = 5.0
    failures_before_replace: int = 2  # failed polls in a row before a worker is replaced
    startup_timeout_s: float = 600.0  # a worker still starting after this has failed
    # A running request's tokens leave a worker at most this often (first and last at
    # once) while stream_full_at requests stream to one router replica; in
    # proportion to the requests streaming otherwise, up to stream_interval_max_s (or
    # stream_interval_s, if that is more).
    # Larger values cost the relay less per token (WorkerConfig).
    stream_interval_s: float = 0.05
    stream_full_at: int = 50
    stream_interval_max_s: float = 0.2
    migration: MigrationConfig = field(default_factory=MigrationConfig)  # live migration (docs/migration.md)
    scaling_interval_s: float = 1.0  # how often pools that scale are looked at
    # Prefill workers (docs/disaggregation.md): stream the prompt's KV while it computes;
    # ask a full decode worker again for this long; a call to the other worker of a
    # migration or handoff slower than migration_call_timeout_s ends it.
    handoff_streaming: bool = True
    handoff_stream_unit: str = "layer"  # a streamed send waits for each "layer" of a forward, or its "chunk"
    handoff_wait_s: float = 5.0
    migration_call_timeout_s: float = 30.0
    retire_timeout_s: float = 600.0  # a worker removed from its pool has this long to drain

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum():
            raise ValueError(f"name must be letters, digits and dashes, got {self.name!r}")
        self._check_pools()
        if not isinstance(self.failures_before_replace, int) or self.failures_before_replace < 1:
            raise ValueError(f"failures_before_replace must be an integer >= 1, got {self.failures_before_replace!r}")
        for name in ("worker_cpus", "load_poll_interval_s", "health_timeout_s", "startup_timeout_s",
                     "scaling_interval_s", "retire_timeout_s", "migration_call_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.gpus_per_rank >= 0:
            raise ValueError(f"gpus_per_rank must be >= 0, got {self.gpus_per_rank!r}")
        for key, amount in self.rank_resources.items():
            if key in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
                raise ValueError(f"rank_resources[{key!r}] must be a custom resource with a number > 0 (CPUs and "
                                 f"GPUs are worker_cpus and gpus_per_rank), got {amount!r}")
        if not self.handoff_wait_s >= 0:
            raise ValueError(f"handoff_wait_s must be >= 0, got {self.handoff_wait_s!r}")
        if not isinstance(self.handoff_streaming, bool):
            raise ValueError(f"handoff_streaming must be true or false, got {self.handoff_streaming!r}")
        if self.handoff_stream_unit not in STREAM_UNITS:
            raise ValueError(f"handoff_stream_unit must be one of {STREAM_UNITS}, got {self.handoff_stream_unit!r}")
        if not 0 <= self.stream_interval_s <= 1:
            raise ValueError(f"stream_interval_s must be in [0, 1], got {self.stream_interval_s!r}")
        if isinstance(self.stream_full_at, bool) or not isinstance(self.stream_full_at, int) \
                or self.stream_full_at < 0:
            raise ValueError(f"stream_full_at must be an integer >= 0, got {self.stream_full_at!r}")
        if not 0 <= self.stream_interval_max_s <= 1:
            raise ValueError(f"stream_interval_max_s must be in [0, 1], got {self.stream_interval_max_s!r}")

    def _check_pools(self) -> None:
        if MIXED_POOL in self.pools:
            raise ValueError(f"pools: {MIXED_POOL!r} is the pool of num_workers; give a further mixed pool "
                             f"a name of its own")
        for name, pool in self.pools.items():
            if not isinstance(name, str) or not _POOL_NAME.fullmatch(name):
                raise ValueError(f"pools: name {name!r} must be lowercase letters, digits and '-', at most 32")
            if name not in SPLIT_ROLES and pool.scaling != PoolScaling():
                raise ValueError(f"pools.{name}: only the prefill and decode pools scale; a mixed pool "
                                 f"keeps num_workers and has no scaling settings")
            try:
                self.engine_for(name)
            except ValueError as e:
                raise ValueError(f"pools.{name}.engine: {e}") from None
        split = sorted(set(self.pools) & set(SPLIT_ROLES))
        if split and len(split) != len(SPLIT_ROLES):
            raise ValueError(f"pools: prefill and decode come together (a prefill worker hands its requests "
                             f"to a decode worker), got only {split}")
        least = 0 if self.pools else 1
        if not isinstance(self.num_workers, int) or self.num_workers < least:
            raise ValueError(f"num_workers must be an integer >= {least}, got {self.num_workers!r}")
        if self.disaggregated:
            prefill, decode = self.engine_for("prefill"), self.engine_for("decode")
            for role, engine in (("prefill", prefill), ("decode", decode)):
                if engine.backend != "yard":
                    raise ValueError(f"pools.{role}: backend {engine.backend!r} cannot hand KV from prefill to "
                                     f"decode workers; prefill and decode pools run backend 'yard'")
            differ = [f"{k}: prefill {getattr(prefill, k)!r}, decode {getattr(decode, k)!r}"
                      for k in KV_SETTINGS if getattr(prefill, k) != getattr(decode, k)]
            if differ:
                raise ValueError(f"pools: the prefill and decode engines must lay out KV alike; "
                                 f"{'; '.join(differ)}")

    def engine_for(self, pool_name: str) -> EngineConfig:
        """The engine settings of a pool's workers: the pool's over the cluster's."""
        pool = self.pools.get(pool_name)
        return dataclasses.replace(self.engine, **pool.engine) if pool and pool.engine else self.engine

    def worker_config(self, worker_id: str, pool_name: str = MIXED_POOL) -> WorkerConfig:
        """What a worker of a pool runs with: the pool's engine, and the cluster's
        stream, migration and handoff settings."""
        return WorkerConfig(worker_id=worker_id, engine=self.engine_for(pool_name), role=self.pool_role(pool_name),
                            pool=pool_name, stream_interval_s=self.stream_interval_s,
                            stream_full_at=self.stream_full_at, stream_interval_max_s=self.stream_interval_max_s,
                            migration_pause_blocks=self.migration.stage_threshold_blocks,
                            migration_call_timeout_s=self.migration_call_timeout_s,
                            handoff_wait_s=self.handoff_wait_s, handoff_streaming=self.handoff_streaming,
                            handoff_stream_unit=self.handoff_stream_unit)

    @staticmethod
    def pool_role(pool_name: str) -> str:
        """The role of a pool's workers: prefill, decode, or mixed for every other pool."""
        return pool_name if pool_name in SPLIT_ROLES else "mixed"

    def worker_bundles(self, pool_name: str = MIXED_POOL) -> list[dict[str, float]]:
        """One worker's placement group (workers/parallel/bundles.py): bundle 0 for the
        worker actor (rank 0), one per further tensor-parallel rank, then one per
        attention worker."""
        pool = self.pools.get(pool_name)
        cpus = pool.worker_cpus if pool and pool.worker_cpus is not None else self.worker_cpus
        gpus = pool.gpus_per_rank if pool and pool.gpus_per_rank is not None else self.gpus_per_rank
        engine = self.engine_for(pool_name)

        def bundle(cpus: float, gpus: float = gpus) -> dict[str, float]:
            return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **self.rank_resources}
        if engine.backend == "vllm":
            # vLLM starts its tensor-parallel ranks as processes of the worker actor:
            # they see only the actor's own resources, so one bundle holds them all.
            tp = engine.tensor_parallel_size
            return [bundle(cpus + engine.tp_cpus_per_rank * (tp - 1), gpus * tp)]
        ranks = [bundle(cpus)] + [bundle(engine.tp_cpus_per_rank)] * (engine.tensor_parallel_size - 1)
        offload = engine.attention_offload
        return ranks + (offload.bundles() if offload is not None else [])

    def pool_sizes(self) -> list[tuple[str, int]]:
        """(pool name, count) of the workers to run at start."""
        mixed = [(MIXED_POOL, self.num_workers)] if self.num_workers else []
        split = [(role, self.pools[role].num_workers) for role in SPLIT_ROLES if role in self.pools]
        return mixed + split + [(name, p.num_workers) for name, p in self.pools.items() if name not in SPLIT_ROLES]

    @property
    def disaggregated(self) -> bool:
        return any(role in self.pools for role in SPLIT_ROLES)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ClusterConfig":
        """From parsed YAML/JSON: unknown keys fail with the list of known ones."""
        raw = dict(raw)
        engine = engine_settings(raw.pop("engine", {}))
        migration = raw.pop("migration", {}) or {}
        pools = raw.pop("pools", {}) or {}
        _check_keys("cluster", raw, {f.name for f in fields(cls)} - {"engine", "migration", "pools"})
        _check_keys("engine", engine, {f.name for f in fields(EngineConfig)})
        for name, pool in pools.items():
            _check_keys(f"pools.{name}", pool or {}, {f.name for f in fields(PoolConfig)})
        return cls(engine=EngineConfig(**engine), migration=MigrationConfig.from_dict(migration),
                   pools={name: _pool(pool or {}) for name, pool in pools.items()}, **raw)


def engine_settings(raw: Any) -> dict[str, Any]:
    """An `engine:` section as EngineConfig settings: `engine: vllm` (the cluster's or a
    pool's) is short for `engine: {backend: vllm}`."""
    if isinstance(raw, str):
        return {"backend": raw}
    return dict(raw or {})


def _pool(raw: dict[str, Any]) -> PoolConfig:
    raw = dict(raw)
    if "engine" in raw:
        raw["engine"] = engine_settings(raw["engine"])
    return PoolConfig(scaling=PoolScaling.from_dict(raw.pop("scaling", {}) or {}), **raw)


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'field: old -> new' for every setting that differs between two configs
    (dataclasses, compared field by field, nested ones too)."""
    changes = []
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if hasattr(a, "__dataclass_fields__") and type(a) is type(b):
            changes += config_changes(a, b, f"{prefix}{f.name}.")
        elif a != b:
            changes.append(f"{prefix}{f.name}: {a!r} -> {b!r}")
    return changes


def _check_keys(section: str, raw: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown {section} settings {unknown}; known: {sorted(known)}")
