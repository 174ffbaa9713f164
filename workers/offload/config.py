"""`attention_offload` in a worker's engine settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class AttentionOffloadConfig:
    workers: int = 1  # K attention workers; each holds num_kv_heads / K of the KV heads
    micro_batches: int = 2  # m: a decode step's batch split in m, so that attention and dense work overlap
    cpus_per_worker: float = 1.0
    # Extra resources each attention worker's bundle asks for: a resource label that puts
    # it on another device kind (a KubeRay worker group that advertises it).
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("workers", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attention_offload.{name} must be an integer >= 1, got {value!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"attention_offload.cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        for key, amount in self.resources.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
                raise ValueError(f"attention_offload.resources[{key!r}] must be a number > 0, got {amount!r}")

    def bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per attention worker: its CPUs and the resources
        that place it."""
        return [{"CPU": self.cpus_per_worker, **self.resources} for _ in range(self.workers)]

    @classmethod
    def parse(cls, raw: Optional[Any]) -> Optional["AttentionOffloadConfig"]:
        if raw is None or isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"attention_offload must be a mapping such as {{workers: 2}}, got {raw!r}")
        unknown = set(raw) - {"workers", "micro_batches", "cpus_per_worker", "resources"}
        if unknown:
            raise ValueError(f"attention_offload has unknown keys {sorted(unknown)}; known: workers, "
                             f"micro_batches, cpus_per_worker, resources")
        return cls(**raw)
