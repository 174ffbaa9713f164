"""The leader's side of a live expert re-placement (workers/models/expert_mover.py
does the moving on every rank): one changed layer staged per engine step, then the
swap, all through the commands the other ranks follow between steps."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from workers.experts.table import PlacementTable
from workers.models.expert_mover import StagingFailed, movable
from workers.parallel.commands import RankCommand, StageExperts, SwapExperts

if TYPE_CHECKING:
    from workers.models.mixtral import MixtralForCausalLM

_RESULTS_KEPT = 16


@dataclass(frozen=True)
class ReplacementResult:
    outcome: str  # "done" or "aborted"
    seconds: float  # from begin() to the swap (or the abort)
    layers_moved: int  # layers whose slots changed, staged and swapped
    steps_delayed: int  # engine steps that waited for a layer to be staged
    error: Optional[str] = None


class ExpertMoves:
    def __init__(self, model: "MixtralForCausalLM", clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.tp, self.clock = model, model.tp, clock
        self.target: Optional[PlacementTable] = None
        self._layers: list[int] = []  # still to stage
        self._started_at = 0.0
        self._moved = self._delayed = 0
        self.results: tuple[ReplacementResult, ...] = ()  # the last few, oldest first; replaced whole
        self.num_results = 0

    @property
    def table(self) -> PlacementTable:
        return self.model.placement

    @property
    def moving(self) -> bool:
        return self.target is not None

    def begin(self, new: PlacementTable) -> None:
        movable(self.table, new)
        if self.moving:
            raise RuntimeError("an expert re-placement is already under way; wait for it to end")
        self.target, self._started_at, self._moved, self._delayed = new, self.clock(), 0, 0
        self._layers = [layer for layer in range(new.num_layers) if new.slots[layer] != self.table.slots[layer]]

    def advance(self, stepping: bool) -> Optional[ReplacementResult]:
        """Stage the next layer, or swap once all are staged; the result when the move
        ends. `stepping`: a step waits for this (counted as delayed)."""
        if not self._layers:
            self._broadcast(SwapExperts(self.target.to_dict()))
            self.model.adopt_placement(self.target)
            return self._end("done", None)
        layer = self._layers.pop(0)
        self._delayed += stepping
        self._broadcast(StageExperts(self.target.to_dict(), layer))
        try:
            self.model.mover.stage(self.target, layer)
        except StagingFailed as e:  # every rank has dropped what it staged
            return self._end("aborted", str(e))
        self._moved += 1
        return None

    def _end(self, outcome: str, error: Optional[str]) -> ReplacementResult:
        result = ReplacementResult(outcome, self.clock() - self._started_at, self._moved if outcome == "done" else 0,
                                   self._delayed, error)
        self.results = (self.results + (result,))[-_RESULTS_KEPT:]
        self.num_results += 1
        self.target, self._layers = None, []
        return result

    def _broadcast(self, command: RankCommand) -> None:
        if self.tp.size > 1:
            self.tp.broadcast_object(command)
