"""A MoE worker's routing statistics: what its model counted (RoutingRecorder), taken
once a period on the stepping thread and summed over a sliding window, for the
`experts` call (`yard experts WORKER_ID`), the expert metrics and, with expert
parallelism, the placement policies (workers/experts/)."""

from __future__ import annotations

from typing import Any, Optional

from workers.experts.stats import RoutingWindow
from workers.models.routing_recorder import RoutingRecorder

PERIOD_S = 1.0  # how often the counts leave the device (one host sync)
WINDOW_S = 60.0  # the window the statistics cover


class ExpertStatistics:
    def __init__(self, recorder: RoutingRecorder, top_k: int, metrics: Any = None) -> None:
        self.recorder = recorder
        self.top_k = top_k
        self.window = RoutingWindow(recorder.num_layers, recorder.num_experts, steps=int(WINDOW_S / PERIOD_S))
        self.metrics = metrics  # WorkerMetrics, or None
        self._taken_at: Optional[float] = None

    @classmethod
    def of(cls, model: Any, metrics: Any = None) -> Optional["ExpertStatistics"]:
        """For a model that routes to experts; None for a dense one."""
        recorder = getattr(model, "routing", None)
        if not isinstance(recorder, RoutingRecorder):
            return None
        return cls(recorder, model.cfg.num_experts_per_token, metrics)

    def maybe_take(self, now: float) -> None:
        """On the stepping thread (the recorder's counts change there)."""
        if self._taken_at is not None and now - self._taken_at < PERIOD_S:
            return
        self._taken_at = now
        counts = self.recorder.take()
        self.window.add(counts)
        if self.metrics is not None:
            self.metrics.expert_tokens(counts.loads)

    def snapshot(self) -> dict[str, Any]:
        total = self.window.total  # replaced whole by add(): a consistent read from any thread
        return {"num_layers": total.num_layers, "num_experts": total.num_experts, "top_k": self.top_k,
                "window_s": len(self.window) * PERIOD_S, "loads": [list(r) for r in total.loads],
                "transitions": [[list(r) for r in m] for m in total.transitions],
                "table": None}  # no expert parallelism yet: every expert on this worker's one rank
