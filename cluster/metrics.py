"""The cluster manager's metrics, through Ray's metrics API (exported as
`ray_yard_cluster_*`): how many workers are healthy, unhealthy or starting, how many
the config asks for, and how many were replaced. Names: docs/metrics.md."""

from __future__ import annotations

from ray.util import metrics

WORKER_STATES = ("healthy", "unhealthy", "booting")


class ClusterMetrics:
    def __init__(self, cluster: str, desired: int) -> None:
        self.tags = {"cluster": cluster}
        self.workers = metrics.Gauge("yard_cluster_workers", "workers by state", ("cluster", "state"))
        self.desired = metrics.Gauge("yard_cluster_workers_desired", "workers the config asks for", ("cluster",))
        self.replacements = metrics.Counter("yard_cluster_worker_replacements",
                                            "workers replaced after failing their health checks", ("cluster",))
        self._desired = desired

    def states(self, counts: dict[str, int]) -> None:
        """Set on every poll: a gauge set once, as the actor starts, can be lost
        before Ray's exporter is up."""
        self.desired.set(self._desired, self.tags)
        for state in WORKER_STATES:
            self.workers.set(counts.get(state, 0), {**self.tags, "state": state})

    def replaced(self) -> None:
        self.replacements.inc(1, self.tags)
