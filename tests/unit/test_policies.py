"""Dispatch policies: exact choices from hand-made load reports, an injected rng and a
fake clock; the freeness formula; validation of load reports and policy config."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from typing import Any

import pytest

from router.load import WorkerLoad, freeness
from router.policies import (Decision, DispatchRequest, Flood, LeastLoad, NoWorkerAvailable, PowerOfTwoChoices,
                             PrefixAware, RoundRobin, SessionAffinity, make_policy)
from router.prefix_policy import leading_hits, prompt_block_hashes
from workers.engine.block_manager import BlockManager, chain_hash
from workers.engine.sequence import Sequence
from workers.sampling_params import SamplingParams


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def load(worker_id: str, **kw: Any) -> WorkerLoad:
    fields: dict[str, Any] = dict(healthy=True, num_running=0, num_waiting=0, free_blocks=100,
                                  total_blocks=100, freeness=100.0, mean_step_time_s=0.01, reported_at=0.0)
    fields.update(kw)
    return WorkerLoad(worker_id=worker_id, **fields)


def req(rid: str = "r", tokens: tuple[int, ...] = (1, 2, 3), session: str | None = None) -> DispatchRequest:
    return DispatchRequest(rid, tokens, session)


def picks(policy: Any, workers: list[WorkerLoad], n: int, **kw: Any) -> list[str]:
    return [policy.choose(req(f"r{i}", **kw), workers).worker_id for i in range(n)]


# -- load report ---------------------------------------------------------------------
def test_freeness_formula() -> None:
    assert freeness(free_blocks=10, num_running=4, head_of_line_blocks=2, block_size=16) == 32.0
    assert freeness(10, 0, 0, 16) == 160.0  # idle: its free token slots
    assert freeness(1, 2, 3, 16) == -16.0  # the queue's head does not fit: overloaded
    assert freeness(0, 0, 0, 1) == 0.0


@pytest.mark.parametrize("args, message", [
    ((-1, 0, 0, 16), "free_blocks must be >= 0, got -1"),
    ((0, -2, 0, 16), "num_running must be >= 0, got -2"),
    ((0, 0, -3, 16), "head_of_line_blocks must be >= 0, got -3"),
    ((0, 0, 0, 0), "block_size must be >= 1, got 0"),
])
def test_freeness_rejects_bad_values(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        freeness(*args)


@pytest.mark.parametrize("kw, message", [
    (dict(num_running=-1), "num_running must be >= 0, got -1"),
    (dict(num_waiting=-2), "num_waiting must be >= 0, got -2"),
    (dict(free_blocks=-3), "free_blocks must be >= 0, got -3"),
    (dict(total_blocks=-4, free_blocks=0), "total_blocks must be >= 0, got -4"),
    (dict(free_blocks=101), r"free_blocks \(101\) must be <= total_blocks \(100\)"),
    (dict(role="router"), "role must be one of .* got 'router'"),
    (dict(freeness=math.nan), "freeness must be a number, got nan"),
    (dict(mean_step_time_s=-0.5), "mean_step_time_s must be >= 0, got -0.5"),
    (dict(cached_block_hashes={1, 2}), "cached_block_hashes must be a frozenset, got set"),
])
def test_worker_load_validation(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load("w0", **kw)


def test_worker_load_defaults_and_queue_length() -> None:
    w = load("w0", num_running=3, num_waiting=2, freeness=-8.0)
    assert (w.role, w.cached_block_hashes, w.queue_length) == ("mixed", frozenset(), 5)
    with pytest.raises(ValueError, match="worker_id must be a non-empty string"):
        load("")


def test_dispatch_request_wants_a_tuple() -> None:
    with pytest.raises(ValueError, match="prompt_token_ids must be a tuple, got list"):
        DispatchRequest("r", [1, 2])  # type: ignore[arg-type]


# -- round robin, power of two, least load ------------------------------------------------
def test_round_robin_order_skips_unhealthy_and_follows_membership() -> None:
    rr = RoundRobin()
    ws = [load("w2"), load("w0"), load("w1")]  # snapshot order does not matter
    assert picks(rr, ws, 4) == ["w0", "w1", "w2", "w0"]
    ws = [load("w0"), load("w1", healthy=False), load("w2")]
    assert picks(rr, ws, 2) == ["w2", "w0"]  # after w0: w1 is down, so w2
    # w1 comes back and w3 joins after w0: the turn goes on from w0, not from a counter.
    assert picks(rr, [load("w0"), load("w1"), load("w3")], 3) == ["w1", "w3", "w0"]
    d = rr.choose(req(), [load("w0")])
    assert d == Decision("w0", "round_robin", 0, "next in turn")


def test_power_of_two_takes_the_lighter_of_the_sampled_pair() -> None:
    ws = [load("w0"), load("w1", num_running=5), load("w2", num_running=2, num_waiting=1)]
    # random.Random(0).sample over [w0, w1, w2] (sorted by id) draws the pairs
    # (w1, w2), (w0, w1), (w2, w1), (w1, w2).
    p2c = PowerOfTwoChoices(random.Random(0))
    assert picks(p2c, ws[::-1], 4) == ["w2", "w0", "w2", "w2"]  # w0, the lightest, is not always drawn
    d = PowerOfTwoChoices(random.Random(0)).choose(req(), ws)
    assert d == Decision("w2", "power_of_two", 0, "lighter than w1 (queue 3 vs 5)")


def test_power_of_two_tie_goes_to_more_free_blocks_and_single_worker() -> None:
    ws = [load("w0", num_running=1, free_blocks=10), load("w1", num_waiting=1, free_blocks=40)]
    assert picks(PowerOfTwoChoices(random.Random(0)), ws, 3) == ["w1", "w1", "w1"]
    one = [load("w0", healthy=False), load("w1")]
    assert PowerOfTwoChoices(random.Random(0)).choose(req(), one).reason == "only healthy worker"


def test_least_load_highest_freeness_ties_by_id() -> None:
    ll = LeastLoad()
    ws = [load("w2", freeness=50.0), load("w1", freeness=50.0), load("w0", freeness=-4.0)]
    assert ll.choose(req(), ws) == Decision("w1", "least_load", 0, "highest freeness 50")
    ws.append(load("w3", freeness=80.0, healthy=False))
    assert ll.choose(req(), ws).worker_id == "w1"


# -- flood -------------------------------------------------------------------------------
def test_flood_sends_everything_to_the_smallest_healthy_worker() -> None:
    ws = [load("w2"), load("w1", num_running=50, freeness=-3.0), load("w0", healthy=False)]
    assert picks(Flood(), ws, 3) == ["w1", "w1", "w1"]  # load does not matter
    assert Flood().choose(req(), ws) == Decision("w1", "flood", 0, "smallest worker_id")


def test_flood_target_while_healthy_else_the_smallest() -> None:
    ws = [load("w0"), load("w1"), load("w2")]
    assert Flood("w2").choose(req(), ws) == Decision("w2", "flood", 0, "target")
    ws[2] = load("w2", healthy=False)
    assert Flood("w2").choose(req(), ws) == Decision("w0", "flood", 0,
                                                     "target w2 not healthy; smallest worker_id")
    assert Flood("w9").choose(req(), ws).worker_id == "w0"  # not a candidate at all
    with pytest.raises(ValueError, match="target must be a non-empty worker id, got ''"):
        Flood("")


@pytest.mark.parametrize("name", ["round_robin", "power_of_two", "least_load", "flood", "prefix_aware",
                                  "session_affinity"])
def test_no_healthy_worker_raises(name: str) -> None:
    policy = make_policy(name, rng=random.Random(0), clock=FakeClock(),
                         **(dict(block_size=4, imbalance_guard=2) if name == "prefix_aware" else {}))
    with pytest.raises(NoWorkerAvailable, match="no healthy worker for request 'r' \\(0 candidates"):
        policy.choose(req(session="s"), [])
    with pytest.raises(NoWorkerAvailable, match="\\(2 candidates, none healthy\\)"):
        policy.choose(req(session="s"), [load("w0", healthy=False), load("w1", healthy=False)])


# -- prefix aware ------------------------------------------------------------------------
BS = 4
PROMPT = tuple(range(100, 113))  # 13 tokens: 3 full blocks the engine can reuse


def hashes_of(tokens: tuple[int, ...], n: int) -> list[int]:
    out, parent = [], None
    for i in range(n):
        parent = chain_hash(parent, tokens[i * BS:(i + 1) * BS])
        out.append(parent)
    return out


def test_prompt_hashes_match_the_engine_and_stop_before_the_last_token() -> None:
    assert prompt_block_hashes(PROMPT, BS) == hashes_of(PROMPT, 3)
    assert len(prompt_block_hashes(PROMPT[:12], BS)) == 2  # the 12th token is computed, not cached
    assert prompt_block_hashes((), BS) == []
    # The engine's own bookkeeping: cache a prompt, then ask it about a longer one.
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = Sequence("a", list(PROMPT[:9]), 9, SamplingParams(), max_tokens=4)
    hits = bm.lookup_prefix(first)
    bm.admit(first, hits, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.commit_computed(first)
    second = Sequence("b", list(PROMPT), len(PROMPT), SamplingParams(), max_tokens=4)
    realized = len(bm.lookup_prefix(second))
    predicted = leading_hits(prompt_block_hashes(PROMPT, BS), frozenset(bm.cached))
    assert predicted == realized == 2


def test_leading_hits_stop_at_the_first_miss() -> None:
    h = hashes_of(PROMPT, 3)
    assert leading_hits(h, {h[0], h[2]}) == 1
    assert leading_hits(h, {h[1], h[2]}) == 0
    assert leading_hits(h, set(h)) == 3


def test_prefix_aware_picks_the_longest_cached_prefix() -> None:
    h = hashes_of(PROMPT, 3)
    ws = [load("w0", cached_block_hashes=frozenset(h[:1])),
          load("w1", cached_block_hashes=frozenset(h), num_running=3),
          load("w2", cached_block_hashes=frozenset({h[0], h[2]}))]
    d = PrefixAware(BS, imbalance_guard=4).choose(req(tokens=PROMPT), ws)
    assert d == Decision("w1", "prefix_aware", 3, "3 of 3 blocks cached")
    # w1 is down; w0 and w2 hold one leading block each: the shorter queue wins.
    ws[0] = load("w0", cached_block_hashes=frozenset(h[:1]), num_waiting=1)
    ws[1] = load("w1", healthy=False, cached_block_hashes=frozenset(h))
    d = PrefixAware(BS, imbalance_guard=4).choose(req(tokens=PROMPT), ws)
    assert (d.worker_id, d.predicted_hit_blocks) == ("w2", 1)


def test_prefix_aware_without_hits_is_least_loaded() -> None:
    ws = [load("w0", num_running=2), load("w1", num_running=1, freeness=10.0),
          load("w2", num_running=1, freeness=30.0)]
    d = PrefixAware(BS, imbalance_guard=4).choose(req(tokens=PROMPT), ws)
    assert d == Decision("w2", "prefix_aware", 0, "0 of 3 blocks cached")


def test_imbalance_guard_overrides_the_cache() -> None:
    h = hashes_of(PROMPT, 3)
    ws = [load("w0", cached_block_hashes=frozenset(h), num_running=8, num_waiting=3),
          load("w1", cached_block_hashes=frozenset(h[:1]), num_running=4),
          load("w2", num_running=2)]
    # Queues 11, 4, 2: w0 is 9 over the shortest.
    assert PrefixAware(BS, imbalance_guard=9).choose(req(tokens=PROMPT), ws).worker_id == "w0"
    d = PrefixAware(BS, imbalance_guard=8).choose(req(tokens=PROMPT), ws)
    assert d == Decision("w1", "prefix_aware", 1,
                         "guard: w0 holds 3 blocks but its queue 11 exceeds the shortest 2 by more "
                         "than 8; 1 of 3 blocks cached")
    d = PrefixAware(BS, imbalance_guard=1).choose(req(tokens=PROMPT), ws)
    assert (d.worker_id, d.predicted_hit_blocks) == ("w2", 0)


def test_prefix_aware_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        PrefixAware(0, 1)
    with pytest.raises(ValueError, match="imbalance_guard must be >= 0, got -1"):
        PrefixAware(4, -1)


# -- session affinity ---------------------------------------------------------------------
WS = [load("w0"), load("w1"), load("w2")]


def test_session_sticks_and_others_use_the_fallback() -> None:
    clock = FakeClock()
    sa = SessionAffinity(RoundRobin(), clock, ttl_s=10)
    assert sa.choose(req(session="a"), WS) == Decision("w0", "session_affinity", 0,
                                                        "new session; round_robin: next in turn")
    assert sa.choose(req(session="b"), WS).worker_id == "w1"
    assert sa.choose(req(session="a"), WS) == Decision("w0", "session_affinity", 0, "session 'a' sticks")
    assert sa.choose(req(), WS).reason == "no session; round_robin: next in turn"
    assert len(sa) == 2


def test_session_expires_after_ttl_since_last_use() -> None:
    clock = FakeClock()
    sa = SessionAffinity(RoundRobin(), clock, ttl_s=10)
    assert sa.choose(req(session="a"), WS).worker_id == "w0"
    for t in (9.0, 18.0):  # each use refreshes the mapping
        clock.now = t
        assert sa.choose(req(session="a"), WS).worker_id == "w0"
    clock.now = 28.0  # 10 s since the last use: expired, the fallback chooses again
    d = sa.choose(req(session="a"), WS)
    assert (d.worker_id, d.reason) == ("w1", "new session; round_robin: next in turn")
    clock.now = 100.0
    sa.choose(req(), WS)  # requests without a session do not sweep, ...
    assert len(sa) == 1
    sa.choose(req(session="b"), WS)  # ... session requests do
    assert len(sa) == 1


def test_session_fails_over_when_its_worker_is_unhealthy() -> None:
    sa = SessionAffinity(LeastLoad(), FakeClock(), ttl_s=10)
    assert sa.choose(req(session="a"), WS).worker_id == "w0"
    down = [load("w0", healthy=False), load("w1", freeness=5.0), load("w2", freeness=7.0)]
    d = sa.choose(req(session="a"), down)
    assert d == Decision("w2", "session_affinity", 0,
                         "session's worker w0 not healthy; least_load: highest freeness 7")
    # w0 is back, but the session now lives on w2.
    assert sa.choose(req(session="a"), WS).worker_id == "w2"


def test_session_map_is_bounded() -> None:
    sa = SessionAffinity(RoundRobin(), FakeClock(), ttl_s=10, max_sessions=2)
    assert [sa.choose(req(session=s), WS).worker_id for s in "abc"] == ["w0", "w1", "w2"]
    assert len(sa) == 2
    assert sa.choose(req(session="a"), WS).reason.startswith("new session")  # a was the oldest
    assert sa.choose(req(session="c"), WS).reason == "session 'c' sticks"


def test_session_keeps_the_prefix_fallbacks_prediction() -> None:
    h = hashes_of(PROMPT, 3)
    sa = make_policy("session_affinity", fallback="prefix_aware", block_size=BS, imbalance_guard=4,
                     ttl_s=5, clock=FakeClock())
    ws = [load("w0"), load("w1", cached_block_hashes=frozenset(h[:2]))]
    d = sa.choose(req(tokens=PROMPT, session="a"), ws)
    assert (d.worker_id, d.policy, d.predicted_hit_blocks) == ("w1", "session_affinity", 2)


def test_session_affinity_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="ttl_s must be > 0, got 0"):
        SessionAffinity(RoundRobin(), FakeClock(), ttl_s=0)
    with pytest.raises(ValueError, match="max_sessions must be >= 1, got 0"):
        SessionAffinity(RoundRobin(), FakeClock(), max_sessions=0)


# -- factory -------------------------------------------------------------------------
def test_make_policy_builds_each_policy() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    assert isinstance(make_policy("power_of_two", rng=random.Random(1)), PowerOfTwoChoices)
    assert isinstance(make_policy("least_load", rng=random.Random(1), clock=FakeClock()), LeastLoad)
    assert make_policy("flood").target is None and make_policy("flood", target="w1").target == "w1"
    sa_flood = make_policy("session_affinity", fallback="flood", target="w1")
    assert isinstance(sa_flood, SessionAffinity) and sa_flood.fallback.target == "w1"
    pa = make_policy("prefix_aware", block_size=8, imbalance_guard=3)
    assert isinstance(pa, PrefixAware) and (pa.block_size, pa.imbalance_guard) == (8, 3)
    sa = make_policy("session_affinity", ttl_s=30.0, fallback="power_of_two")
    assert isinstance(sa, SessionAffinity) and isinstance(sa.fallback, PowerOfTwoChoices)
    assert sa.ttl_s == 30.0
    assert isinstance(make_policy("session_affinity").fallback, LeastLoad)


@pytest.mark.parametrize("name, options, message", [
    ("random", {}, r"unknown dispatch policy 'random'; known: \['flood', 'least_load', 'power_of_two', "
                   r"'prefix_aware', 'round_robin', 'session_affinity'\]"),
    ("flood", {"worker": "w1"}, r"unknown option\(s\) \['worker'\] for dispatch policy 'flood'; "
                                r"accepted: \['target'\]"),
    ("least_load", {"block_size": 4}, r"unknown option\(s\) \['block_size'\] for dispatch policy 'least_load'"),
    ("prefix_aware", {"block_size": 4}, r"'prefix_aware' needs option\(s\) \['imbalance_guard'\]"),
    ("session_affinity", {"fallback": "session_affinity"}, "unknown fallback policy 'session_affinity'"),
    ("session_affinity", {"fallback": "sticky"}, "unknown fallback policy 'sticky' for session_affinity"),
    ("session_affinity", {"fallback": "round_robin", "block_size": 4}, r"unknown option\(s\) \['block_size'\]"),
])
def test_make_policy_rejects_bad_config(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy(name, **options)


# -- imports and processes ---------------------------------------------------------------
def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_policies_import_neither_torch_nor_ray() -> None:
    out = _run("import sys, router.policies; print(sorted({'torch', 'ray', 'numpy'} & set(sys.modules)))")
    assert out.strip() == "[]"


def test_router_and_worker_processes_hash_a_prompt_alike() -> None:
    code = f"from router.prefix_policy import prompt_block_hashes; print(prompt_block_hashes({PROMPT!r}, {BS}))"
    assert _run(code).strip() == str(prompt_block_hashes(PROMPT, BS))


def test_router_adjusts_a_stale_report_by_what_it_sent_and_saw_end():
    from router.load_book import adjusted as _adjusted

    stale = load("w", num_running=4, num_waiting=2, freeness=100.0)
    more = _adjusted(stale, +3)
    assert (more.num_running, more.num_waiting) == (4, 5)
    assert more.freeness == pytest.approx(100.0 * 4 / 7)  # the free KV shared by 7
    fewer = _adjusted(stale, -3)  # ended ones leave the queue first, then the batch
    assert (fewer.num_running, fewer.num_waiting, fewer.freeness) == (3, 0, 100.0)
    assert _adjusted(stale, -10).queue_length == 0
    assert _adjusted(stale, 0) is stale


def test_prefill_and_decode_pools_split_a_request_until_one_pool_is_down():
    from router.pd_policy import route

    loads = [load("p0", role="prefill"), load("p1", role="prefill", healthy=False),
             load("d0", role="decode", freeness=5.0), load("d1", role="decode", freeness=9.0),
             load("d2", role="decode", freeness=9.0, num_waiting=2), load("d3", role="decode", freeness=50.0,
                                                                           healthy=False)]
    where = route(loads, (1, 2, 3), block_size=4)
    assert [w.worker_id for w in where.candidates] == ["p0"] and where.handoff_to == "d1"  # freest; fewer queued
    assert not where.direct
    no_decode = [w for w in loads if w.role == "prefill"] + [load("d0", role="decode", healthy=False)]
    assert route(no_decode, (1, 2, 3), 4).candidates == no_decode  # any worker serves it whole
    mixed = [load("m0"), load("m1")]
    assert route(mixed, (1, 2, 3), 4) == route(mixed, (1, 2, 3), 4, 100)
    assert route(mixed, (1, 2, 3), 4).handoff_to is None


def test_the_decider_skips_the_prefill_hop_for_short_or_cached_prompts():
    from router.pd_policy import route

    prompt = tuple(range(10, 50))  # 40 tokens: 10 blocks of 4
    hashes = prompt_block_hashes(prompt, 4)
    loads = [load("p0", role="prefill"), load("d0", role="decode", freeness=50.0),
             load("d1", role="decode", freeness=5.0, cached_block_hashes=frozenset(hashes[:9]))]
    # d1 caches 36 of the 40 tokens: 4 uncached, within 8, so it goes there, no handoff.
    where = route(loads, prompt, 4, decider_max_uncached_tokens=8)
    assert where.direct and [w.worker_id for w in where.candidates] == ["d1"] and where.handoff_to is None
    assert not route(loads, prompt, 4, decider_max_uncached_tokens=3).direct  # 4 uncached > 3
    assert not route(loads, prompt, 4, decider_max_uncached_tokens=0).direct  # off
    short = route(loads, (7, 8, 9), 4, decider_max_uncached_tokens=8)  # nothing cached, but short:
    assert short.direct and [w.worker_id for w in short.candidates] == ["d0"]  # the freest then
    long = route(loads, tuple(range(100, 140)), 4, decider_max_uncached_tokens=8)
    assert not long.direct and long.handoff_to == "d0"


def test_a_prefill_worker_is_chosen_by_the_tokens_it_computes_before_the_first_token():
    from router.load_book import adjusted as _adjusted
    from router.pd_policy import route

    prompt = tuple(range(10, 50))  # 40 tokens: 9 blocks of 4 can come from a cache
    hashes = prompt_block_hashes(prompt, 4)
    decode = load("d0", role="decode")
    busy_cached = load("p0", role="prefill", queued_prefill_tokens=20, cached_block_hashes=frozenset(hashes))
    idle_cold = load("p1", role="prefill")
    # p0: 20 queued + 4 uncached = 24; p1: 0 + 40 = 40.
    where = route([busy_cached, idle_cold, decode], prompt, 4)
    assert [w.worker_id for w in where.candidates] == ["p0"] and where.policy == "prefill_tokens"
    assert where.handoff_to == "d0" and not where.direct
    # 50 tokens this router sent p0 since its report: 74 against 40.
    where = route([_adjusted(busy_cached, 1, 50), idle_cold, decode], prompt, 4)
    assert [w.worker_id for w in where.candidates] == ["p1"]
