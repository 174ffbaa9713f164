"""The cluster tier's configuration: how many workers of which role, and how the
manager watches them. Validated where it is made; YAML is parsed only at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from cluster.migration_policy import MigrationConfig
from workers.engine.config import EngineConfig


@dataclass(frozen=True)
class ClusterConfig:
    name: str = "yard"  # prefixes worker ids and actor names: two clusters need two names
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_workers: int = 2  # mixed-role workers
    worker_cpus: float = 1.0  # Ray CPUs each worker actor asks for
    gpus_per_rank: float = 0.0  # Ray GPUs of each tensor-parallel rank (the worker is rank 0)
    load_poll_interval_s: float = 0.5
    health_timeout_s: float = 5.0
    failures_before_replace: int = 2  # failed polls in a row before a worker is replaced
    startup_timeout_s: float = 600.0  # a worker still starting after this has failed
    # A running request's tokens leave a worker at most this often (first and last at
    # once): larger values cost the relay less per token (WorkerConfig).
    stream_interval_s: float = 0.05
    migration: MigrationConfig = field(default_factory=MigrationConfig)  # live migration (docs/migration.md)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum():
            raise ValueError(f"name must be letters, digits and dashes, got {self.name!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        if not isinstance(self.failures_before_replace, int) or self.failures_before_replace < 1:
            raise ValueError(f"failures_before_replace must be an integer >= 1, got {self.failures_before_replace!r}")
        for name in ("worker_cpus", "load_poll_interval_s", "health_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.gpus_per_rank >= 0:
            raise ValueError(f"gpus_per_rank must be >= 0, got {self.gpus_per_rank!r}")
        if not 0 <= self.stream_interval_s <= 1:
            raise ValueError(f"stream_interval_s must be in [0, 1], got {self.stream_interval_s!r}")

    def worker_bundles(self) -> list[dict[str, float]]:
        """One worker's placement group: bundle 0 for the worker actor (rank 0), one
        per further tensor-parallel rank."""
        def bundle(cpus: float) -> dict[str, float]:
            return {"CPU": cpus, "GPU": self.gpus_per_rank} if self.gpus_per_rank else {"CPU": cpus}
        ranks = self.engine.tensor_parallel_size
        return [bundle(self.worker_cpus)] + [bundle(self.engine.tp_cpus_per_rank)] * (ranks - 1)

    def pools(self) -> list[tuple[str, int]]:
        """(role, count) of the workers to run. Prefill/decode pools come later."""
        return [("mixed", self.num_workers)]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ClusterConfig":
        """From parsed YAML/JSON: unknown keys fail with the list of known ones."""
        raw = dict(raw)
        engine = raw.pop("engine", {}) or {}
        migration = raw.pop("migration", {}) or {}
        _check_keys("cluster", raw, {f.name for f in fields(cls)} - {"engine", "migration"})
        _check_keys("engine", engine, {f.name for f in fields(EngineConfig)})
        return cls(engine=EngineConfig(**engine), migration=MigrationConfig.from_dict(migration), **raw)


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
