"""A MoE worker's routing statistics: what its model counted (RoutingRecorder), taken
once a period on the stepping thread and summed over a sliding window, for the
`experts` call (`yard experts WORKER_ID`), the expert metrics and, with expert
parallelism, the placement policies (workers/experts/)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional

from workers.experts.stats import RoutingWindow
from workers.models.routing_recorder import RoutingRecorder

PERIOD_S = 1.0  # how often the counts leave the device (one host sync)
WINDOW_S = 60.0  # the window the statistics cover


class ExpertStatistics:
    def __init__(self, recorder: RoutingRecorder, top_k: int, metrics: Any = None, model: Any = None,
                 moves: Any = None) -> None:
        self.recorder = recorder
        self.top_k = top_k
        self.window = RoutingWindow(recorder.num_layers, recorder.num_experts, steps=int(WINDOW_S / PERIOD_S))
        self.metrics = metrics  # WorkerMetrics, or None
        # With expert parallelism: the model (its table and dispatch counts) and the
        # engine's ExpertMoves (re-placements).
        self.model, self.moves = model, moves
        self.dispatch = DispatchWindow(steps=int(WINDOW_S / PERIOD_S)) if moves is not None else None
        self._balance: list[Optional[float]] = [None] * recorder.num_layers
        self._results_seen = 0
        self._taken_at: Optional[float] = None

    @classmethod
    def of(cls, model: Any, metrics: Any = None, moves: Any = None) -> Optional["ExpertStatistics"]:
        """For a model that routes to experts; None for a dense one."""
        recorder = getattr(model, "routing", None)
        if not isinstance(recorder, RoutingRecorder):
            return None
        return cls(recorder, model.cfg.num_experts_per_token, metrics, model, moves)

    def maybe_take(self, now: float) -> None:
        """On the stepping thread (the recorder's counts change there)."""
        if self._taken_at is not None and now - self._taken_at < PERIOD_S:
            return
        self._taken_at = now
        counts = self.recorder.take()
        self.window.add(counts)
        if self.metrics is not None:
            self.metrics.expert_tokens(counts.loads)
        if self.dispatch is not None:
            self._take_dispatch()

    def _take_dispatch(self) -> None:
        moved = self.model.dispatch_counts.take()
        self.dispatch.add(moved)
        new = min(self.moves.num_results - self._results_seen, len(self.moves.results))
        results = self.moves.results[len(self.moves.results) - new:]
        self._results_seen = self.moves.num_results
        # Exported every period (Ray drops a gauge not set for a while); with no traffic
        # in the window a layer keeps its last value.
        self._balance = [b if b is not None else last for b, last in zip(self.dispatch.balancedness(), self._balance)]
        if self.metrics is not None:
            self.metrics.expert_dispatch(moved, self._balance)
            for result in results:
                self.metrics.expert_replacement(result.outcome, result.seconds)

    def snapshot(self) -> dict[str, Any]:
        total = self.window.total  # replaced whole by add(): a consistent read from any thread
        out = {"num_layers": total.num_layers, "num_experts": total.num_experts, "top_k": self.top_k,
               "window_s": len(self.window) * PERIOD_S, "loads": [list(r) for r in total.loads],
               "transitions": [[list(r) for r in m] for m in total.transitions], "table": None}
        if self.moves is not None:
            dispatch = self.dispatch.total
            out.update(table=self.model.placement.to_dict(), moving=self.moves.moving,
                       replacements=[dataclasses.asdict(r) for r in self.moves.results],
                       dispatched=[sum(map(sum, m)) for m in dispatch],
                       cross_rank=[sum(map(sum, m)) - sum(m[r][r] for r in range(len(m))) for m in dispatch],
                       balancedness=self.dispatch.balancedness())
        return out


class DispatchWindow:
    """Expert-parallel dispatch counts ([layer][from rank][to rank] → pairs) summed
    over the last `steps` periods."""

    def __init__(self, steps: int) -> None:
        self._periods: collections.deque[list[list[list[int]]]] = collections.deque(maxlen=steps)
        self.total: list[list[list[int]]] = []

    def add(self, moved: list[list[list[int]]]) -> None:
        self._periods.append(moved)
        self.total = [[[sum(p[layer][s][d] for p in self._periods) for d in range(len(row))]
                       for s, row in enumerate(m)] for layer, m in enumerate(moved)]

    def balancedness(self) -> list[Optional[float]]:
        """Per layer, mean over max pairs served per rank (1.0: even; None: no traffic)."""
        out = []
        for m in self.total:
            served = [sum(m[s][d] for s in range(len(m))) for d in range(len(m))]
            out.append(sum(served) / len(served) / max(served) if max(served) else None)
        return out
