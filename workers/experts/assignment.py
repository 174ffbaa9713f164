"""One layer's experts onto ranks, maximizing the tokens that stay on their rank:
each expert's replicas on distinct ranks, every rank's slots filled, and optionally
every rank's load under a cap. An integer program (scipy.optimize.milp) while it is
small; beyond that a greedy heuristic, hierarchical by node then rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# An integer program of more variables than this takes seconds. The heuristic takes
# milliseconds; on the affinity model (bench/experts.py's routing, 4 ranks) its
# placements cross -5% to +6% as many tokens as the program's, and under a balance cap
# balance less well (max/mean 1.14 against 1.08 with 25% redundant slots).
EXACT_MAX_VARIABLES = 4096


@dataclass(frozen=True)
class LayerProblem:
    benefit: Sequence[Sequence[float]]  # [expert][rank]: tokens kept on rank if the expert has a replica there
    replicas: Sequence[int]  # [expert] -> replicas to place (each <= the number of ranks)
    slots_per_rank: int
    weight: Sequence[float] = ()  # [expert] -> load of one replica (for the cap)
    max_rank_load: Optional[float] = None  # None: no balance constraint

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    @property
    def num_ranks(self) -> int:
        return len(self.benefit[0])


def solve(problem: LayerProblem, ranks_per_node: Optional[int] = None) -> list[list[int]]:
    """rank -> its experts, ascending. A balance cap that cannot be met is relaxed."""
    if problem.num_experts * problem.num_ranks <= EXACT_MAX_VARIABLES:
        exact = _milp(problem)
        if exact is not None:
            return exact
        if problem.max_rank_load is not None:
            return solve(_relaxed(problem), ranks_per_node)
    return _greedy_by_node(problem, ranks_per_node or problem.num_ranks)


def _relaxed(problem: LayerProblem) -> LayerProblem:
    cap = problem.max_rank_load
    assert cap is not None
    looser = cap * 1.05 if cap * 1.05 < sum(problem.weight[j] * n for j, n in enumerate(problem.replicas)) else None
    return LayerProblem(problem.benefit, problem.replicas, problem.slots_per_rank, problem.weight, looser)


def _milp(problem: LayerProblem) -> Optional[list[list[int]]]:
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    E, R = problem.num_experts, problem.num_ranks
    objective = -np.array([problem.benefit[j][r] for j in range(E) for r in range(R)], dtype=float)
    per_expert = np.zeros((E, E * R))
    per_rank = np.zeros((R, E * R))
    for j in range(E):
        per_expert[j, j * R:(j + 1) * R] = 1
        per_rank[:, j * R:(j + 1) * R] += np.eye(R)
    constraints = [LinearConstraint(per_expert, problem.replicas, problem.replicas),
                   LinearConstraint(per_rank, problem.slots_per_rank, problem.slots_per_rank)]
    if problem.max_rank_load is not None:
        load = per_rank * np.repeat(np.asarray(problem.weight, dtype=float), R)
        constraints.append(LinearConstraint(load, -np.inf, problem.max_rank_load))
    result = milp(objective, constraints=constraints, integrality=np.ones(E * R), bounds=Bounds(0, 1),
                  options={"time_limit": 10.0})
    if result.x is None:
        return None
    x = np.round(result.x).astype(int).reshape(E, R)
    return [[j for j in range(E) if x[j, r]] for r in range(R)]


def _greedy_by_node(problem: LayerProblem, ranks_per_node: int) -> list[list[int]]:
    """Experts onto nodes first (a node's benefit is its ranks' sum), then within each
    node onto its ranks; one node is plain greedy."""
    R = problem.num_ranks
    if ranks_per_node >= R:
        return _greedy(problem, list(range(R)), list(problem.replicas))
    nodes = [list(range(n, n + ranks_per_node)) for n in range(0, R, ranks_per_node)]
    node_problem = LayerProblem([[sum(row[r] for r in node) for node in nodes] for row in problem.benefit],
                                problem.replicas, problem.slots_per_rank * ranks_per_node, problem.weight,
                                None if problem.max_rank_load is None else problem.max_rank_load * ranks_per_node)
    on_node = _greedy(node_problem, list(range(len(nodes))), list(problem.replicas), max_per_target=ranks_per_node)
    out: list[list[int]] = [[] for _ in range(R)]
    for n, ranks in enumerate(nodes):
        here = sorted(set(on_node[n]))
        sub = LayerProblem([[problem.benefit[j][r] for r in ranks] for j in here],
                           [on_node[n].count(j) for j in here], problem.slots_per_rank,
                           [problem.weight[j] for j in here] if problem.weight else (), problem.max_rank_load)
        for k, experts in enumerate(_greedy(sub, list(range(len(ranks))), list(sub.replicas))):
            out[ranks[k]] = sorted(here[i] for i in experts)
    return out


def _greedy(problem: LayerProblem, targets: list[int], need: list[int], max_per_target: int = 1) -> list[list[int]]:
    """Highest benefit first, within slots and the cap; then what is left to the
    lightest target with room. Ties go to the lower expert, then target."""
    weight = problem.weight or [0.0] * problem.num_experts
    held: list[list[int]] = [[] for _ in targets]
    load = [0.0] * len(targets)
    cap = problem.max_rank_load

    def fits(j: int, t: int, capped: bool) -> bool:
        return (len(held[t]) < problem.slots_per_rank and held[t].count(j) < max_per_target
                and (not capped or cap is None or load[t] + weight[j] <= cap))

    def put(j: int, t: int) -> None:
        held[t].append(j)
        load[t] += weight[j]
        need[j] -= 1

    pairs = sorted(((problem.benefit[j][t], j, t) for j in range(problem.num_experts) for t in range(len(targets))),
                   key=lambda p: (-p[0], p[1], p[2]))
    for gain, j, t in pairs:
        if gain > 0 and need[j] and fits(j, t, capped=True):
            put(j, t)
    # Most replicas still to place first: they need the most distinct targets.
    for j in sorted(range(problem.num_experts), key=lambda j: (-need[j], -weight[j], j)):
        while need[j]:
            room = [t for t in range(len(targets)) if fits(j, t, capped=False)]
            if not room:
                room = [_make_room(held, j, weight, load, problem.slots_per_rank, max_per_target)]
            put(j, min(room, key=lambda t: (load[t], t)))
    return [sorted(h) for h in held]


def _make_room(held: list[list[int]], j: int, weight: Sequence[float], load: list[float], slots: int,
               max_per_target: int) -> int:
    """Every target with a free slot already holds j: move another expert from a full
    target without j into that slot, and return the target it left."""
    for t, here in enumerate(held):
        if len(here) >= slots:
            continue
        for u, there in enumerate(held):
            if there.count(j) >= max_per_target:
                continue
            for x in there:
                if here.count(x) < max_per_target:
                    there.remove(x)
                    here.append(x)
                    load[u] -= weight[x]
                    load[t] += weight[x]
                    return u
    raise ValueError(f"expert {j} has more replicas than there are ranks to hold them")
