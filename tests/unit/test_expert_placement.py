"""Expert placement (workers/experts/): the table, the statistics, what a placement
costs, and the policies, with exact tables; EPLB against DeepSeek's published example."""

from __future__ import annotations

import random

import pytest

from workers.experts import assignment
from workers.experts.policies import PlacementShape, affinity, balanced, combined, contiguous, place_experts
from workers.experts.stats import RoutingStats, RoutingWindow
from workers.experts.table import PlacementTable
from workers.experts.traffic import balancedness, cross_rank_tokens, expected_cross_rank_tokens, rank_loads


def loads_only(loads: list[list[int]]) -> RoutingStats:
    empty = RoutingStats.empty(len(loads), len(loads[0]))
    return RoutingStats(tuple(tuple(r) for r in loads), empty.transitions)


def test_balanced_reproduces_deepseeks_published_eplb_example():
    # deepseek-ai/EPLB's README: 2 layers of 12 experts in 4 groups, 16 replicas on 2 nodes of 4 GPUs.
    weight = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    table = balanced(loads_only(weight), PlacementShape(num_ranks=8, slots_per_rank=2, ranks_per_node=4, num_groups=4))
    assert table.slots == ((5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1),
                           (7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1))
    assert table.replica_counts(0) == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]


def test_balanced_without_groups_balances_globally():
    # One group: the hot expert 0 gets both extra slots, and every rank carries 60 tokens.
    table = balanced(loads_only([[90, 30, 30, 30]]), PlacementShape(num_ranks=3, slots_per_rank=2))
    assert table.replica_counts(0) == [3, 1, 1, 1]
    assert rank_loads(table, [[90, 30, 30, 30]]) == [[60.0, 60.0, 60.0]]
    assert balancedness(table, [[90, 30, 30, 30]]) == [1.0]
    # Where an even split is impossible, heaviest first to the lightest rank: 40+30, 40+20, 40+10.
    uneven = balanced(loads_only([[120, 30, 20, 10]]), PlacementShape(num_ranks=3, slots_per_rank=2))
    assert rank_loads(uneven, [[120, 30, 20, 10]]) == [[70.0, 60.0, 50.0]]


def test_contiguous_places_in_order_and_repeats_the_experts_in_extra_slots():
    table = contiguous(RoutingStats.empty(2, 4), PlacementShape(num_ranks=2, slots_per_rank=3))
    assert table.slots == ((0, 1, 2, 3, 0, 1),) * 2
    assert table.experts_on(0, 1) == (3, 0, 1)
    assert table.replicas[0] == ((0, 4), (1, 5), (2,), (3,))


def affinity_stats() -> RoutingStats:
    # Layer 0 -> 1: the tokens of expert 0 go on to 3, of 1 to 2, of 2 to 0, of 3 to 1.
    moves = [[0, 0, 0, 100], [0, 0, 100, 0], [100, 0, 0, 0], [0, 100, 0, 0]]
    return RoutingStats(((100,) * 4, (100,) * 4), (tuple(tuple(r) for r in moves),))


def test_affinity_puts_each_expert_where_its_tokens_sit():
    stats = affinity_stats()
    shape = PlacementShape(num_ranks=2, slots_per_rank=2)
    table = affinity(stats, shape)
    # Rank 0 holds 0 and 1 at layer 0; their tokens choose 3 and 2 next: so 2 and 3 join rank 0.
    assert table.slots == ((0, 1, 2, 3), (2, 3, 0, 1))
    assert expected_cross_rank_tokens(table, stats) == [0.0]
    assert expected_cross_rank_tokens(contiguous(stats, shape), stats) == [400.0]


def test_the_heuristic_finds_the_same_placement_flat_and_by_node(monkeypatch):
    monkeypatch.setattr(assignment, "EXACT_MAX_VARIABLES", 0)
    stats = affinity_stats()
    assert affinity(stats, PlacementShape(num_ranks=2, slots_per_rank=2)).slots[1] == (2, 3, 0, 1)
    # 8 experts on 2 nodes of 2 ranks: expert e's tokens go on to 7 - e.
    moves = tuple(tuple(100 if j == 7 - i else 0 for j in range(8)) for i in range(8))
    wide = RoutingStats(((100,) * 8, (100,) * 8), (moves,))
    table = affinity(wide, PlacementShape(num_ranks=4, slots_per_rank=2, ranks_per_node=2))
    assert table.slots[1] == (6, 7, 4, 5, 2, 3, 0, 1)
    assert expected_cross_rank_tokens(table, wide) == [0.0]


def test_cross_rank_tokens_follow_each_token_and_its_local_replica():
    table = PlacementTable(4, 2, ((0, 1, 2, 3), (2, 3, 0, 1)))
    # Token 0 starts on rank 0 and picks expert 0 (rank 0), then 3 (rank 0 at layer 1): stays.
    # Token 1 starts on rank 1, picks 0 (rank 0: crosses), then 0 (rank 1: crosses).
    routing = [[[0], [0]], [[3], [0]]]
    assert cross_rank_tokens(table, routing) == [1]
    replicated = PlacementTable(2, 2, ((0, 1), (0, 1)))
    assert cross_rank_tokens(replicated, [[[0], [1]], [[1], [0]]]) == [2]
    # With expert 1 on both ranks at layer 1, token 0 (on rank 0 after layer 0) finds a local replica.
    both = PlacementTable(2, 2, ((0, 1, 0, 1), (0, 1, 1, 0)))
    assert both.choose_slot(1, 1, token=5, near_rank=0) == 1
    assert both.choose_slot(1, 1, token=5) == 2  # no rank given: replicas in turn, by token position


def skewed_stats(num_layers: int = 6, num_experts: int = 16, tokens: int = 4000, seed: int = 7) -> RoutingStats:
    """Hot experts and a strong layer-to-layer affinity: tokens mostly keep a 'lane'."""
    rng = random.Random(seed)
    weights = [1 / (e + 1) for e in range(num_experts)]
    routing = []
    lanes = rng.choices(range(num_experts), weights, k=tokens)
    for layer in range(num_layers):
        shift = (5 * layer) % num_experts
        rows = []
        for t in range(tokens):
            first = (lanes[t] + shift) % num_experts if rng.random() < 0.85 else rng.randrange(num_experts)
            second = (first + 1) % num_experts
            rows.append([first, second])
        routing.append(rows)
    return RoutingStats.count(routing, num_experts)


def test_combined_balances_within_the_slack_and_keeps_most_tokens_local():
    stats = skewed_stats()
    shape = PlacementShape(num_ranks=4, slots_per_rank=5, balance_slack=0.1)  # 25% redundant slots
    plain = contiguous(stats, shape)
    table = combined(stats, shape)
    assert all(b >= 1 / 1.1 - 1e-9 for b in balancedness(table, stats.loads))
    assert sum(expected_cross_rank_tokens(table, stats)) < 0.6 * sum(expected_cross_rank_tokens(plain, stats))
    lone = affinity(stats, PlacementShape(num_ranks=4, slots_per_rank=4))
    assert (sum(expected_cross_rank_tokens(lone, stats))
            < 0.5 * sum(expected_cross_rank_tokens(contiguous(stats, PlacementShape(4, 4)), stats)))


def test_statistics_are_exact_counts_and_the_window_drops_the_oldest_step():
    # Two layers, two tokens, top-2: token 0 picks (1, 0) then (2, 1); token 1 picks (2, 1) then (2, 0).
    step = RoutingStats.count([[[1, 0], [2, 1]], [[2, 1], [2, 0]]], 3)
    assert step.loads == ((1, 2, 1), (1, 1, 2))
    assert step.transitions == (((0, 0, 0), (0, 1, 1), (1, 0, 1)),)
    window = RoutingWindow(2, 3, steps=2)
    other = RoutingStats.count([[[0, 1]], [[0, 2]]], 3)
    for s in (step, other, other):
        window.add(s)
    assert len(window) == 2 and window.total == other + other
    assert window.total.loads == ((2, 2, 0), (2, 0, 2))


def test_bad_tables_and_shapes_are_refused_naming_the_value():
    with pytest.raises(ValueError, match=r"slot 2 names expert 7; the model has experts 0\.\.3"):
        PlacementTable(4, 2, ((0, 1, 7, 3),))
    with pytest.raises(ValueError, match=r"expert_parallel_size 4 does not divide the 6 expert slots"):
        PlacementTable(4, 4, ((0, 1, 2, 3, 0, 1),))
    with pytest.raises(ValueError, match=r"places no slot for experts \[3\]"):
        PlacementTable(4, 2, ((0, 1, 2, 2),))
    with pytest.raises(ValueError, match=r"2 ranks x 1 slots cannot hold 4 experts"):
        contiguous(RoutingStats.empty(1, 4), PlacementShape(num_ranks=2, slots_per_rank=1))
    with pytest.raises(ValueError, match=r"ranks_per_node 3 must divide num_ranks 4"):
        PlacementShape(num_ranks=4, slots_per_rank=1, ranks_per_node=3)
    with pytest.raises(ValueError, match=r"unknown expert placement policy 'eplb'; known: \['affinity', "):
        place_experts("eplb", RoutingStats.empty(1, 4), PlacementShape(2, 2))
    table = PlacementTable(4, 2, ((0, 1, 2, 3),))
    assert PlacementTable.from_dict(table.to_dict()) == table


def test_the_heuristic_makes_room_for_a_replica_when_only_its_own_ranks_have_free_slots(monkeypatch):
    monkeypatch.setattr(assignment, "EXACT_MAX_VARIABLES", 0)
    # Experts 1 and 2 fill rank 0 (their tokens sit there); expert 0 needs a replica on
    # both ranks, but after its first on rank 1 the only free slot is on rank 1 too:
    # expert 1 moves over to make room on rank 0.
    problem = assignment.LayerProblem(benefit=[[0, 0], [9, 0], [8, 0]], replicas=[2, 1, 1], slots_per_rank=2)
    assert assignment.solve(problem) == [[0, 2], [0, 1]]
