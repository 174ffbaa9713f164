"""A router replica's metrics, through Ray's metrics API (exported as `ray_yard_router_*`
on every node's Prometheus endpoint). Names and meanings: docs/metrics.md."""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class RouterMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.requests = metrics.Counter("yard_router_requests", "requests by final status",
                                        ("model", "status"))
        self.ttft = metrics.Histogram("yard_router_time_to_first_token_seconds", "time to first token",
                                      LATENCY_BOUNDARIES, ("model",))
        self.tpot = metrics.Histogram("yard_router_time_per_output_token_seconds",
                                      "time per output token after the first", TPOT_BOUNDARIES, ("model",))
        self.e2e = metrics.Histogram("yard_router_e2e_latency_seconds", "request latency, end to end",
                                     LATENCY_BOUNDARIES, ("model",))
        self.dispatch = metrics.Counter("yard_router_dispatch_decisions", "dispatch decisions",
                                        ("model", "policy", "worker"))
        self.predicted_hits = metrics.Counter("yard_router_prefix_predicted_hit_blocks",
                                              "prefix-cache blocks the policy expected to hit", ("model",))
        self.realized_hits = metrics.Counter("yard_router_prefix_realized_hit_blocks",
                                             "prefix-cache blocks the worker reported hitting", ("model",))
        self.in_flight = metrics.Gauge("yard_router_requests_in_flight", "requests being served",
                                       ("model",))
        self._in_flight = 0

    def finished(self, status: str) -> None:
        self.requests.inc(1, {"model": self.model, "status": status})

    def dispatched(self, policy: str, worker: str, predicted_hit_blocks: int) -> None:
        self.dispatch.inc(1, {"model": self.model, "policy": policy, "worker": worker})
        if predicted_hit_blocks:
            self.predicted_hits.inc(predicted_hit_blocks, {"model": self.model})

    def timings(self, ttft_s: float, tpot_s: float | None, e2e_s: float, realized_hit_blocks: int) -> None:
        tags = {"model": self.model}
        self.ttft.observe(ttft_s, tags)
        if tpot_s is not None:
            self.tpot.observe(tpot_s, tags)
        self.e2e.observe(e2e_s, tags)
        if realized_hit_blocks:
            self.realized_hits.inc(realized_hit_blocks, tags)

    def started(self, delta: int) -> None:
        self._in_flight += delta
        self.in_flight.set(self._in_flight, {"model": self.model})

    def keep_alive(self) -> None:
        """Set the gauges again: Ray stops exporting a gauge that is not set for a
        while, and an idle router's in-flight count changes rarely."""
        self.in_flight.set(self._in_flight, {"model": self.model})
