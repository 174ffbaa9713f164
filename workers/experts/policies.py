"""Placement policies: a PlacementTable from the routing statistics.

  contiguous  expert e on rank e // (experts per rank); extra slots repeat the experts
              in order. The baseline.
  balanced    DeepSeek's EPLB (eplb.py): replicas for hot experts, packed so that
              ranks carry equal load; hierarchical by node when groups divide nodes.
  affinity    ExFlow's: layer by layer, each expert goes to the rank where the tokens
              that will choose it sit (traffic.py), so that they need not move. No
              replicas beyond contiguous's.
  combined    balanced's replicas, placed by affinity under a cap on each rank's load
              (balance_slack over the mean).
Plain Python (the integer program is scipy's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from workers.experts.assignment import LayerProblem, solve
from workers.experts.eplb import rebalance_layer, replicate
from workers.experts.stats import RoutingStats
from workers.experts.table import PlacementTable


@dataclass(frozen=True)
class PlacementShape:
    num_ranks: int
    slots_per_rank: int
    ranks_per_node: Optional[int] = None  # None: one node
    num_groups: int = 1  # expert groups (balanced keeps a group on one node)
    balance_slack: float = 0.1  # combined: a rank's load at most (1 + slack) x the mean

    def __post_init__(self) -> None:
        for name in ("num_ranks", "slots_per_rank", "num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expert placement: {name} must be an integer >= 1, got {value!r}")
        if self.ranks_per_node is not None and (self.ranks_per_node < 1 or self.num_ranks % self.ranks_per_node):
            raise ValueError(f"expert placement: ranks_per_node {self.ranks_per_node!r} must divide "
                             f"num_ranks {self.num_ranks}")
        if not self.balance_slack >= 0:
            raise ValueError(f"expert placement: balance_slack must be >= 0, got {self.balance_slack!r}")

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // (self.ranks_per_node or self.num_ranks)


def contiguous(stats: RoutingStats, shape: PlacementShape) -> PlacementTable:
    _check_room(stats, shape)
    row = tuple(slot % stats.num_experts for slot in range(shape.num_slots))
    return PlacementTable(stats.num_experts, shape.num_ranks, (row,) * stats.num_layers)


def balanced(stats: RoutingStats, shape: PlacementShape) -> PlacementTable:
    _check_room(stats, shape)
    rows = tuple(tuple(rebalance_layer(load, shape.num_slots, shape.num_ranks, shape.num_groups, shape.num_nodes))
                 for load in stats.loads)
    return PlacementTable(stats.num_experts, shape.num_ranks, rows)


def affinity(stats: RoutingStats, shape: PlacementShape) -> PlacementTable:
    _check_room(stats, shape)
    base = contiguous(stats, shape)
    counts = [base.replica_counts(layer) for layer in range(stats.num_layers)]
    return _by_affinity(stats, shape, base.slots[0], counts, cap=None)


def combined(stats: RoutingStats, shape: PlacementShape) -> PlacementTable:
    _check_room(stats, shape)
    first = tuple(rebalance_layer(stats.loads[0], shape.num_slots, shape.num_ranks, shape.num_groups,
                                  shape.num_nodes))
    counts = [replicate(load, shape.num_slots, shape.num_ranks)[1] for load in stats.loads]
    return _by_affinity(stats, shape, first, counts, cap=1 + shape.balance_slack)


def _by_affinity(stats: RoutingStats, shape: PlacementShape, first: tuple[int, ...], counts: list[list[int]],
                 cap: Optional[float]) -> PlacementTable:
    """Layer 0 as given; each next layer solved for the tokens its predecessor leaves
    on each rank (a first choice's tokens shared equally by its replicas)."""
    rows = [first]
    n = shape.slots_per_rank
    for layer in range(1, stats.num_layers):
        prev = rows[-1]
        prev_counts = [prev.count(e) for e in range(stats.num_experts)]
        benefit = [[0.0] * shape.num_ranks for _ in range(stats.num_experts)]
        for slot, i in enumerate(prev):
            r = slot // n
            for j, moved in enumerate(stats.transitions[layer - 1][i]):
                benefit[j][r] += moved / prev_counts[i]
        load = stats.loads[layer]
        weight = [load[e] / counts[layer][e] for e in range(stats.num_experts)]
        max_load = None if cap is None else cap * sum(load) / shape.num_ranks
        ranks = solve(LayerProblem(benefit, counts[layer], n, weight, max_load), shape.ranks_per_node)
        rows.append(tuple(e for held in ranks for e in held))
    return PlacementTable(stats.num_experts, shape.num_ranks, tuple(rows))


def _check_room(stats: RoutingStats, shape: PlacementShape) -> None:
    if shape.num_slots < stats.num_experts:
        raise ValueError(f"{shape.num_ranks} ranks x {shape.slots_per_rank} slots cannot hold "
                         f"{stats.num_experts} experts")


POLICIES: dict[str, Callable[[RoutingStats, PlacementShape], PlacementTable]] = {
    "contiguous": contiguous, "balanced": balanced, "affinity": affinity, "combined": combined}


def place_experts(policy: str, stats: RoutingStats, shape: PlacementShape) -> PlacementTable:
    if policy not in POLICIES:
        raise ValueError(f"unknown expert placement policy {policy!r}; known: {sorted(POLICIES)}")
    return POLICIES[policy](stats, shape)
