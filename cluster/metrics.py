"""The cluster manager's metrics, through Ray's metrics API (exported as
`ray_yard_cluster_*`): how many workers are healthy, unhealthy or starting, how many
the config asks for, how many were replaced, and the live migrations it ordered.
Names: docs/metrics.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.util import metrics

if TYPE_CHECKING:
    from workers.migration import MigrationResult

WORKER_STATES = ("healthy", "unhealthy", "booting", "draining")
MIGRATION_STAGE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16]
TRANSFER_RATE_BOUNDARIES = [1e6, 1e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10]


class ClusterMetrics:
    def __init__(self, cluster: str) -> None:
        self.tags = {"cluster": cluster}
        self.workers = metrics.Gauge("yard_cluster_workers", "workers by state", ("cluster", "state"))
        self.desired = metrics.Gauge("yard_cluster_workers_desired", "workers the config asks for", ("cluster",))
        self.pool_size = metrics.Gauge("yard_cluster_pool_size", "workers each pool should have now",
                                       ("cluster", "pool"))
        self.replacements = metrics.Counter("yard_cluster_worker_replacements",
                                            "workers replaced after failing their health checks", ("cluster",))
        self.migrations = metrics.Counter("yard_cluster_migrations", "live migrations ended, by reason and outcome",
                                          ("cluster", "reason", "outcome"))
        self.migrations_in_flight = metrics.Gauge("yard_cluster_migrations_in_flight", "live migrations running",
                                                  ("cluster",))
        self.migrated_blocks = metrics.Counter("yard_cluster_migration_blocks", "KV blocks copied by migrations",
                                               ("cluster",))
        self.migrated_bytes = metrics.Counter("yard_cluster_migration_bytes", "KV bytes copied by migrations",
                                              ("cluster",))
        self.migration_stages = metrics.Histogram("yard_cluster_migration_stages", "copies per committed migration",
                                                  MIGRATION_STAGE_BOUNDARIES, ("cluster",))
        self.transfer_rate = metrics.Histogram("yard_cluster_migration_transfer_bytes_per_second",
                                               "KV bytes per second of copying, per migration",
                                               TRANSFER_RATE_BOUNDARIES, ("cluster",))

    def states(self, counts: dict[str, int], migrations_in_flight: int, pool_sizes: dict[str, int]) -> None:
        """Set on every poll: a gauge set once, as the actor starts, can be lost
        before Ray's exporter is up."""
        self.desired.set(sum(pool_sizes.values()), self.tags)
        for pool, size in pool_sizes.items():
            self.pool_size.set(size, {**self.tags, "pool": pool})
        self.migrations_in_flight.set(migrations_in_flight, self.tags)
        for state in WORKER_STATES:
            self.workers.set(counts.get(state, 0), {**self.tags, "state": state})

    def replaced(self) -> None:
        self.replacements.inc(1, self.tags)

    def migration_ended(self, result: "MigrationResult") -> None:
        self.migrations.inc(1, {**self.tags, "reason": result.reason, "outcome": result.outcome})
        if result.blocks:
            self.migrated_blocks.inc(result.blocks, self.tags)
            self.migrated_bytes.inc(result.bytes, self.tags)
            if result.copy_s > 0:
                self.transfer_rate.observe(result.bytes / result.copy_s, self.tags)
        if result.committed:
            self.migration_stages.observe(result.stages, self.tags)
