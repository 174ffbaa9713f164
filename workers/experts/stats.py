"""Routing statistics: per MoE layer, tokens per expert, and transitions from a
token's expert at layer l to its experts at layer l + 1, summed over a sliding
window of steps.

A transition counts from the token's first choice at layer l (the expert whose rank
the token sits on after the layer, see traffic.py) to each of its choices at l + 1.
Plain Python: the ranks count with torch and hand over plain lists per step.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

# [layer][token] -> the token's chosen experts at that layer, first choice first
Routing = Sequence[Sequence[Sequence[int]]]


@dataclass(frozen=True)
class RoutingStats:
    loads: tuple[tuple[int, ...], ...]  # [layer][expert] -> tokens routed to it
    transitions: tuple[tuple[tuple[int, ...], ...], ...]  # [layer l][i][j]: first choice i at l, a choice j at l+1

    @property
    def num_layers(self) -> int:
        return len(self.loads)

    @property
    def num_experts(self) -> int:
        return len(self.loads[0])

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> "RoutingStats":
        return cls(tuple((0,) * num_experts for _ in range(num_layers)),
                   tuple(tuple((0,) * num_experts for _ in range(num_experts)) for _ in range(num_layers - 1)))

    @classmethod
    def count(cls, routing: Routing, num_experts: int) -> "RoutingStats":
        """Exact counts for a routing known token by token."""
        num_layers = len(routing)
        loads = [[0] * num_experts for _ in range(num_layers)]
        moves = [[[0] * num_experts for _ in range(num_experts)] for _ in range(num_layers - 1)]
        for layer, tokens in enumerate(routing):
            for t, chosen in enumerate(tokens):
                for e in chosen:
                    loads[layer][e] += 1
                if layer + 1 < num_layers:
                    for e in routing[layer + 1][t]:
                        moves[layer][chosen[0]][e] += 1
        return cls(_freeze2(loads), tuple(_freeze2(m) for m in moves))

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        return self._combine(other, 1)

    def __sub__(self, other: "RoutingStats") -> "RoutingStats":
        return self._combine(other, -1)

    def _combine(self, other: "RoutingStats", sign: int) -> "RoutingStats":
        if (other.num_layers, other.num_experts) != (self.num_layers, self.num_experts):
            raise ValueError(f"routing stats of {other.num_layers} layers x {other.num_experts} experts cannot "
                             f"combine with {self.num_layers} x {self.num_experts}")
        return RoutingStats(
            tuple(tuple(a + sign * b for a, b in zip(x, y)) for x, y in zip(self.loads, other.loads)),
            tuple(tuple(tuple(a + sign * b for a, b in zip(r, s)) for r, s in zip(m, n))
                  for m, n in zip(self.transitions, other.transitions)))


class RoutingWindow:
    """The sum of the last `steps` steps' statistics: adding a step drops the oldest."""

    def __init__(self, num_layers: int, num_experts: int, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"the statistics window must hold at least 1 step, got {steps}")
        self._steps: collections.deque[RoutingStats] = collections.deque()
        self.limit = steps
        self.total = RoutingStats.empty(num_layers, num_experts)

    def add(self, step: RoutingStats) -> None:
        self._steps.append(step)
        self.total = self.total + step
        if len(self._steps) > self.limit:
            self.total = self.total - self._steps.popleft()

    def __len__(self) -> int:
        return len(self._steps)


def _freeze2(rows: list[list[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(r) for r in rows)
