"""Migration policy: the exact orders (request, source, destination, reason) that one plan
makes from hand-made worker views and a fake clock; config and view validation.

Default config unless a test says otherwise: balance_threshold 3, reserve_blocks 1, one
migration in and one out per worker, rule shortest_first, priority rule off."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from cluster.migration_policy import (MigrationConfig, MigrationOrder, MigrationPolicy, RequestView, WorkerView,
                                      virtual_freeness, worker_view)
from workers.load_report import LoadReport, RequestLoad, kv_group_of


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def r(rid: str, blocks: int, priority: int = 0, arrival: float = 0.0, migrating: bool = False) -> RequestView:
    return RequestView(rid, priority, blocks, arrival, migrating)


def w(wid: str, free: int, *running: RequestView, total: int = 100, healthy: bool = True,
      draining: bool = False, **kw: Any) -> WorkerView:
    return WorkerView(wid, healthy, draining, free, total, running, **kw)


def o(rid: str, source: str, destination: str, reason: str = "balance") -> MigrationOrder:
    return MigrationOrder(rid, source, destination, reason)


def plan(workers: list[WorkerView], clock: FakeClock | None = None, **config: Any) -> list[MigrationOrder]:
    policy = MigrationPolicy(MigrationConfig(enabled=True, **config), clock or FakeClock())
    return policy.plan(workers)


# -- freeness --------------------------------------------------------------------------
def test_virtual_freeness_counts_head_of_line_and_priority_headroom() -> None:
    config = MigrationConfig(priority_headroom_blocks=6, high_priority=2)
    assert virtual_freeness(w("w", 20, r("a", 5), r("b", 5), head_of_line_blocks=4), config) == 8.0
    assert virtual_freeness(w("w", 20, r("a", 5, priority=2), r("b", 5), head_of_line_blocks=4), config) == 5.0
    assert virtual_freeness(w("w", 20), config) == 20.0  # idle: divided by 1
    assert virtual_freeness(w("w", 2, r("a", 5), head_of_line_blocks=8), config) == -6.0
    assert virtual_freeness(w("w", 90, draining=True), config) == -math.inf


# -- balance ----------------------------------------------------------------------------
# w0: 10 free / 3 running = 3.33; w1: 90 free / 1 running = 90.
BUSY = [w("w0", 10, r("a", 30, arrival=3.0), r("b", 20, arrival=1.0), r("c", 40, arrival=2.0)),
        w("w1", 90, r("d", 10))]


@pytest.mark.parametrize("rule, request_id", [
    ("shortest_first", "b"),  # 20 blocks
    ("longest_first", "c"),  # 40 blocks: w0 and w1 end at 25 each, not an overshoot
    ("last_come_first", "a"),  # arrived at 3.0
])
def test_balance_moves_the_request_the_rule_picks(rule: str, request_id: str) -> None:
    assert plan(BUSY, rule=rule) == [o(request_id, "w0", "w1")]


def test_balance_pairs_least_free_with_freest_and_repeats() -> None:
    ws = [w("w0", 12, r("y1", 10), r("y2", 10)),  # 6
          w("w1", 4, r("x2", 10), r("x1", 10)),  # 2: the lowest
          w("w2", 80, r("z", 10)),  # 80: the freest
          w("w3", 60, r("v", 10))]  # 60
    # x1 (the tie with x2 goes by request_id) to w2; w1 has sent its one; then w0 (6) with
    # the freest worker still under its in-cap, w3.
    assert plan(ws) == [o("x1", "w1", "w2"), o("y1", "w0", "w3")]


def test_gap_within_threshold_orders_nothing() -> None:
    ws = [w("w0", 10, r("a", 10), r("b", 10)), w("w1", 16, r("c", 5), r("d", 5))]  # 5 and 8
    assert plan(ws) == []  # gap 3 does not exceed 3
    assert plan(ws, balance_threshold=1000.0) == []


def test_no_overshoot() -> None:
    # Gap 3 exceeds 2.9, but moving a leaves w0 at 20/1 and w1 at 6/3: worse the other way.
    ws = [w("w0", 10, r("a", 10), r("b", 10)), w("w1", 16, r("c", 5), r("d", 5))]
    assert plan(ws, balance_threshold=2.9) == []
    # longest_first's pick, big, would leave w0 at 40/2 and w1 at 20/2: it moves the next
    # request in rule order that does not overshoot (s1 before s2 by request_id).
    ws = [w("w0", 0, r("big", 40), r("s1", 5), r("s2", 5)), w("w1", 60, r("d", 1))]
    assert plan(ws, rule="longest_first") == [o("s1", "w0", "w1")]
    # After a, w1 (40/1) is the freest, but b would leave it at 30/2 below w0's 20/1: w2.
    ws = [w("w0", 0, r("a", 10), r("b", 10), r("c", 10)), w("w1", 50), w("w2", 40)]
    assert plan(ws, max_in_per_worker=2, max_out_per_worker=2) == [o("a", "w0", "w1"), o("b", "w0", "w2")]


def test_a_request_that_does_not_fit_is_skipped_for_the_next() -> None:
    # reserve_blocks keeps 1 block free on the destination: 39 fits into 40, 50 does not.
    ws = [w("w0", 0, r("a", 50), r("b", 39), r("c", 5), draining=True), w("w1", 40, total=40)]
    assert plan(ws, rule="longest_first") == [o("b", "w0", "w1", "drain")]
    assert plan(ws, rule="longest_first", reserve_blocks=2) == [o("c", "w0", "w1", "drain")]
    ws[1] = w("w1", 40, total=40, head_of_line_blocks=2)  # the head of its own queue comes first
    assert plan(ws, rule="longest_first") == [o("c", "w0", "w1", "drain")]


def test_single_request_source_is_not_balanced_but_is_drained() -> None:
    ws = [w("w0", 0, r("a", 90)), w("w1", 100)]
    assert plan(ws) == []
    ws[0] = w("w0", 0, r("a", 90), draining=True)
    assert plan(ws) == [o("a", "w0", "w1", "drain")]


def test_caps_count_orders_and_migrations_in_flight() -> None:
    ws = [w("w0", 0, r("a", 10), r("b", 10), r("c", 10)), w("w1", 100), w("w2", 40)]
    assert plan(ws) == [o("a", "w0", "w1")]  # one out of w0
    # Two out of w0, but one into w1: the second goes to w2.
    assert plan(ws, max_out_per_worker=2) == [o("a", "w0", "w1"), o("b", "w0", "w2")]
    assert plan(ws, max_out_per_worker=2, max_in_per_worker=2) == [o("a", "w0", "w1"), o("b", "w0", "w1")]
    # One already in flight into w1: only w2 may take one.
    ws[1] = w("w1", 100, migrations_in=1)
    assert plan(ws, max_out_per_worker=2) == [o("a", "w0", "w2")]
    # One already in flight out of w0: none.
    ws[0] = w("w0", 0, r("a", 10), r("b", 10), r("c", 10), migrations_out=1)
    assert plan(ws) == []


# -- drain -----------------------------------------------------------------------------
def test_drain_moves_what_it_can_within_caps_to_the_freest_fitting_worker() -> None:
    ws = [w("w0", 10, r("a", 10), r("b", 30), r("c", 50), draining=True),
          w("w1", 45, r("x", 5)),  # 45
          w("w2", 60, r("y", 5), r("z", 5)),  # 30
          w("w3", 100, healthy=False)]  # the freest, but down
    # One out of w0 by default: the shortest, to the freest.
    assert plan(ws) == [o("a", "w0", "w1", "drain")]
    # a to w1 (its one in), b to w2; c fits neither w1 (cap) nor anything else.
    assert plan(ws, max_out_per_worker=3) == [o("a", "w0", "w1", "drain"), o("b", "w0", "w2", "drain")]
    # longest_first: c (50) does not fit w1's 45 free, so it goes to w2 (freeness 30 < 45);
    # b then to w1; a has nowhere left under the in-caps.
    assert plan(ws, max_out_per_worker=3, rule="longest_first") == [o("c", "w0", "w2", "drain"),
                                                                   o("b", "w0", "w1", "drain")]


def test_drain_goes_first_and_takes_the_in_cap_balance_wanted() -> None:
    ws = [w("w0", 0, r("a", 10), draining=True),
          w("w1", 10, r("p", 5), r("q", 5), r("s", 5)),  # 3.3: balance's source
          w("w2", 90),  # the freest: drain takes its one in
          w("w3", 60)]
    assert plan(ws) == [o("a", "w0", "w2", "drain"), o("p", "w1", "w3")]


def test_draining_worker_is_never_a_destination() -> None:
    ws = [w("w0", 0, r("a", 10), r("b", 10)), w("w1", 100, draining=True)]
    assert plan(ws) == []


# -- defrag ----------------------------------------------------------------------------
def test_defrag_moves_the_fewest_largest_requests_that_cover_the_deficit() -> None:
    # The head of w0's queue needs 30 blocks, 4 are free: b (20) and c (15) cover the 26.
    ws = [w("w0", 4, r("a", 10), r("b", 20), r("c", 15), r("d", 5), head_of_line_blocks=30),
          w("w1", 50), w("w2", 40)]
    assert plan(ws, max_out_per_worker=2, balance_threshold=1000.0) == [o("b", "w0", "w1", "defrag"),
                                                                       o("c", "w0", "w2", "defrag")]


def test_defrag_orders_nothing_when_it_cannot_cover_the_deficit() -> None:
    ws = [w("w0", 4, r("a", 10), r("b", 20), r("c", 15), r("d", 5), head_of_line_blocks=30),
          w("w1", 50), w("w2", 40)]
    # Two moves are needed, one is allowed out of w0: nothing, rather than half of it.
    assert plan(ws, balance_threshold=1000.0) == []
    # b outranks the queue's head: c, a and d are needed, three moves.
    ws[0] = w("w0", 4, r("a", 10), r("b", 20, priority=1), r("c", 15), r("d", 5), head_of_line_blocks=30)
    assert plan(ws, max_out_per_worker=2, balance_threshold=1000.0) == []
    ws.append(w("w3", 30))
    assert plan(ws, max_out_per_worker=3, balance_threshold=1000.0) == [
        o("c", "w0", "w1", "defrag"), o("a", "w0", "w2", "defrag"), o("d", "w0", "w3", "defrag")]
    # A head that would not fit even an empty worker is not defragmented for.
    ws[0] = w("w0", 4, r("a", 10), r("c", 15), head_of_line_blocks=101)
    assert plan(ws, max_out_per_worker=3, balance_threshold=1000.0) == []


def test_defrag_rolls_back_so_balance_sees_the_worker_untouched() -> None:
    # Defrag fails (two moves, cap one), then balance moves the shortest from w0.
    ws = [w("w0", 4, r("a", 10), r("b", 20), r("c", 15), r("d", 5), head_of_line_blocks=30),
          w("w1", 50), w("w2", 40)]
    assert plan(ws) == [o("d", "w0", "w1")]


# -- priority ---------------------------------------------------------------------------
PRIORITY = [w("w0", 5, r("h", 10, priority=2), r("m", 5, priority=1), r("l2", 30), r("l1", 10)),
            w("w1", 100, r("g", 1, priority=5)),  # the freest, but runs a high-priority request
            w("w2", 50), w("w3", 40)]


def test_priority_headroom_moves_lower_priority_requests_away_from_high_ones() -> None:
    # Lowest priority first (l1, l2 at 0, shortest first), until 20 blocks are free.
    got = plan(PRIORITY, priority_headroom_blocks=20, high_priority=2, max_out_per_worker=2,
               balance_threshold=1000.0)
    assert got == [o("l1", "w0", "w2", "priority"), o("l2", "w0", "w3", "priority")]
    # One out: l1 only; m (priority 1) would have been next after l2.
    got = plan(PRIORITY, priority_headroom_blocks=20, high_priority=2, balance_threshold=1000.0)
    assert got == [o("l1", "w0", "w2", "priority")]


def test_priority_rule_is_off_without_headroom_and_quiet_when_met() -> None:
    assert plan(PRIORITY, high_priority=2, max_out_per_worker=2, balance_threshold=1000.0) == []
    assert plan(PRIORITY, priority_headroom_blocks=5, high_priority=2, balance_threshold=1000.0) == []


def test_each_request_is_ordered_once_across_rules() -> None:
    # Defrag moves y (the largest) off w0; the priority rule then wants 40 free beside h
    # and moves x, not y again; w1 has taken its one, so x goes to w2.
    ws = [w("w0", 5, r("h", 10, priority=1), r("x", 10), r("y", 30), head_of_line_blocks=20),
          w("w1", 100), w("w2", 50)]
    got = plan(ws, priority_headroom_blocks=40, max_out_per_worker=2)
    assert got == [o("y", "w0", "w1", "defrag"), o("x", "w0", "w2", "priority")]


# -- eligibility ---------------------------------------------------------------------------
def test_unhealthy_workers_are_neither_source_nor_destination() -> None:
    ws = [w("w0", 0, r("a", 10), r("b", 10)),
          w("w1", 100, healthy=False),  # the freest
          w("w2", 50),
          w("w3", 0, r("c", 5), healthy=False, draining=True),  # not drained
          w("w4", 0, r("d", 1), r("e", 1), r("f", 1), healthy=False)]  # the least free
    assert plan(ws) == [o("a", "w0", "w2")]


def test_migrating_and_cooling_down_requests_are_not_chosen() -> None:
    clock = FakeClock(0.0)
    policy = MigrationPolicy(MigrationConfig(enabled=True), clock)
    ws = [w("w0", 0, r("a", 5, migrating=True), r("b", 10), r("c", 20)), w("w1", 100)]
    assert policy.plan(ws) == [o("b", "w0", "w1")]
    # b now runs on w1, which is the busy one; b would be the shortest to send back.
    back = [w("w0", 100), w("w1", 0, r("b", 10), r("x", 20), r("y", 30))]
    clock.now = 4.9
    assert policy.plan(back) == [o("x", "w1", "w0")]
    clock.now = 5.0  # b's cooldown is over
    assert policy.plan(back) == [o("b", "w1", "w0")]
    assert len(policy) == 2  # x (4.9) and b (5.0); b's first entry was forgotten
    clock.now = 100.0
    assert policy.plan([w("w0", 100)]) == [] and len(policy) == 0


def test_disabled_policy_still_drains_but_does_not_balance() -> None:
    assert MigrationPolicy(MigrationConfig(), FakeClock()).plan(BUSY) == []
    ws = [w("w0", 0, r("a", 10), draining=True), w("w1", 50), w("w2", 4, r("x", 10), r("y", 10))]
    assert MigrationPolicy(MigrationConfig(), FakeClock()).plan(ws) == [o("a", "w0", "w1", "drain")]
    # So callers skip a disabled policy only while nothing drains.
    disabled = MigrationPolicy(MigrationConfig(), FakeClock())
    assert (disabled.has_work(any_draining=False), disabled.has_work(any_draining=True)) == (False, True)
    assert MigrationPolicy(MigrationConfig(enabled=True), FakeClock()).has_work(any_draining=False)


def test_duplicate_worker_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"worker ids must be unique, got \['w0', 'w0'\]"):
        plan([w("w0", 1), w("w0", 2)])


# -- determinism ----------------------------------------------------------------------------
def test_ties_go_by_worker_id_then_request_id_whatever_the_input_order() -> None:
    ws = [w("w3", 4, r("x2", 10), r("x1", 10)), w("w2", 50), w("w1", 50),
          w("w0", 0, r("a2", 10), r("a1", 10), draining=True),
          w("w4", 4, r("q", 10), r("p", 10), head_of_line_blocks=12)]
    expected = [o("a1", "w0", "w1", "drain"), o("p", "w4", "w2", "defrag")]
    assert plan(ws, balance_threshold=1000.0) == expected
    rng = random.Random(7)
    for _ in range(20):
        shuffled = [WorkerView(v.worker_id, v.healthy, v.draining, v.free_blocks, v.total_blocks,
                               tuple(rng.sample(v.running, len(v.running))), v.head_of_line_blocks)
                    for v in rng.sample(ws, len(ws))]
        assert plan(shuffled, balance_threshold=1000.0) == expected
        assert plan(shuffled, max_in_per_worker=2, max_out_per_worker=2) == plan(ws, max_in_per_worker=2,
                                                                                 max_out_per_worker=2)


# -- config and views -------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(enabled="yes"), "enabled must be a bool, got 'yes'"),
    (dict(interval_s=0), "interval_s must be a finite number > 0, got 0"),
    (dict(interval_s="1"), "interval_s must be a number, got '1'"),
    (dict(interval_s=math.nan), "interval_s must be a finite number > 0, got nan"),
    (dict(balance_threshold=-1.0), "balance_threshold must be a finite number >= 0, got -1.0"),
    (dict(request_cooldown_s=math.inf), "request_cooldown_s must be a finite number >= 0, got inf"),
    (dict(rule="random"), r"rule must be one of \['shortest_first', 'longest_first', 'last_come_first'\], "
                          r"got 'random'"),
    (dict(max_in_per_worker=0), "max_in_per_worker must be an integer >= 1, got 0"),
    (dict(max_out_per_worker=True), "max_out_per_worker must be an integer, got True"),
    (dict(high_priority=1.5), "high_priority must be an integer, got 1.5"),
    (dict(priority_headroom_blocks=-1), "priority_headroom_blocks must be an integer >= 0, got -1"),
    (dict(reserve_blocks=-2), "reserve_blocks must be an integer >= 0, got -2"),
    (dict(stage_threshold_blocks=0), "stage_threshold_blocks must be an integer >= 1, got 0"),
])
def test_config_validation_names_field_and_value(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MigrationConfig(**kw)


def test_config_from_dict() -> None:
    config = MigrationConfig.from_dict({"enabled": True, "rule": "longest_first", "max_in_per_worker": 2})
    assert config == MigrationConfig(enabled=True, rule="longest_first", max_in_per_worker=2)
    known = (r"\['balance_threshold', 'enabled', 'high_priority', 'interval_s', 'max_in_per_worker', "
             r"'max_out_per_worker', 'priority_headroom_blocks', 'request_cooldown_s', 'reserve_blocks', "
             r"'rule', 'stage_threshold_blocks'\]")
    unknown = r"unknown migration settings \['interval', 'treshold'\]; known: "
    with pytest.raises(ValueError, match=unknown + known):
        MigrationConfig.from_dict({"treshold": 3, "interval": 1, "enabled": True})
    with pytest.raises(ValueError, match="rule must be one of"):
        MigrationConfig.from_dict({"rule": "fifo"})


def test_views_and_orders_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="num_blocks must be >= 0, got -1 \\(request 'a'\\)"):
        r("a", -1)
    with pytest.raises(ValueError, match="request_id must be a non-empty string, got ''"):
        r("", 1)
    with pytest.raises(ValueError, match="worker_id must be a non-empty string, got ''"):
        w("", 1)
    with pytest.raises(ValueError, match=r"free_blocks \(101\) must be <= total_blocks \(100\) \(worker 'w0'\)"):
        w("w0", 101)
    with pytest.raises(ValueError, match="head_of_line_blocks must be >= 0, got -1"):
        w("w0", 1, head_of_line_blocks=-1)
    with pytest.raises(ValueError, match="running must be a tuple, got list"):
        WorkerView("w0", True, False, 1, 1, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reason must be one of .* got 'whim'"):
        o("a", "w0", "w1", "whim")
    with pytest.raises(ValueError, match="source and destination must differ, both are 'w0'"):
        o("a", "w0", "w0")


# -- what a worker's report lets the policy move -----------------------------------------------
def report(kv_migration: bool, draining: bool = False) -> LoadReport:
    requests = (RequestLoad("greedy", 0, 3, 1.0, True, False), RequestLoad("seeded", 0, 3, 2.0, True, False, False),
                RequestLoad("queued", 0, 0, 3.0, False, False))
    return LoadReport("w0", "mixed", True, 2, 1, 10, 20, 0.0, 0.0, frozenset(), 0.0, draining=draining,
                      requests=requests, kv_migration=kv_migration)


def test_a_worker_that_moves_by_replay_shows_only_requests_replay_can_move() -> None:
    """A yard worker moves any running request with its KV; a vLLM worker replays
    tokens into its destination, so its seeded (not recomputable) request is not there."""
    def seen(load: LoadReport) -> list[str]:
        return [v.request_id for v in worker_view(load, True, False, set(), 0, 0).running]

    assert seen(report(kv_migration=True)) == ["greedy", "seeded"]
    assert seen(report(kv_migration=False)) == ["greedy"]
    assert seen(report(kv_migration=True, draining=True)) == ["greedy", "seeded", "queued"]
    assert seen(report(kv_migration=False, draining=True)) == ["greedy", "queued"]


@dataclass(frozen=True)
class Layout:
    model: str
    block_size: int


def test_kv_groups_are_equal_exactly_for_equal_layouts() -> None:
    assert kv_group_of("vllm", Layout("m", 16)) == kv_group_of("vllm", Layout("m", 16))
    assert kv_group_of("vllm", Layout("m", 16)).startswith("vllm:")
    assert kv_group_of("vllm", Layout("m", 16)) != kv_group_of("vllm", Layout("m", 64))
    assert kv_group_of("vllm", Layout("m", 16)) != kv_group_of("yard", Layout("m", 16))
    assert kv_group_of("vllm", None) == ""  # no layout (vLLM with TP > 1): moves by recompute only


def test_migration_policy_imports_neither_torch_nor_ray() -> None:
    code = "import sys, cluster.migration_policy; print(sorted({'torch', 'ray', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
