"""The simulator's event loop on small hand-made traces, with outcomes worked out by
hand: one request, two requests contending for blocks, a forced migration, a
prefill-to-decode handoff. Step times are round numbers so that times are exact."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest

from cluster.config import ClusterConfig, PoolConfig
from cluster.sim.cluster import Simulation, SimOptions, load_sim_config
from cluster.sim.results import SimResult
from cluster.sim.step_time import StepTimeModel
from cluster.sim.trace import TraceRequest
from router.config import RouterConfig
from workers.engine.config import EngineConfig

EXACT = 1e-12


def timing(base_s: float = 1.0, prefill_token_s: float = 0.0, transfer_latency_s: float = 0.25) -> StepTimeModel:
    # transfer_bytes_per_s so large that a copy costs only its latency
    return StepTimeModel(base_s, prefill_token_s, 0.0, 0.0, 0.0, model="hand-made", kv_block_bytes=1,
                         max_position_embeddings=4096, transfer_bytes_per_s=1e30,
                         transfer_latency_s=transfer_latency_s)


def simulate(trace: list[TraceRequest], *, num_blocks: int = 64, workers: int = 1, policy: str = "round_robin",
             step: Optional[StepTimeModel] = None, setup: Any = None, **cluster: Any) -> tuple[SimResult, Simulation]:
    config = ClusterConfig(engine=EngineConfig(num_kv_blocks=num_blocks), num_workers=workers, **cluster)
    sim = Simulation(config, RouterConfig(policy=policy), step or timing(), trace)
    if setup is not None:
        setup(sim)
    return sim.run(), sim


def times(result: SimResult) -> dict[str, tuple[Optional[float], Optional[float], int]]:
    return {r.request.request_id: (r.first_token_s, r.finished_s, r.output_tokens) for r in result.requests}


def test_one_request_takes_its_prefill_then_one_step_per_token():
    trace = [TraceRequest(0, arrival_s=2.0, prompt_tokens=10, output_tokens=4)]
    result, _ = simulate(trace, step=timing(base_s=0.5, prefill_token_s=0.25))
    (record,) = result.requests
    # prefill: 0.5 + 10 * 0.25 = 3 s; then three decode steps of 0.5 s
    assert record.ttft_s == pytest.approx(3.0, abs=EXACT)
    assert record.e2e_s == pytest.approx(4.5, abs=EXACT)
    assert record.tpot_s == pytest.approx(0.5, abs=EXACT)
    assert (record.status, record.output_tokens, record.workers) == ("ok", 4, ["yard-w0"])
    summary = result.summary(slo_ttft_s=3.0, slo_tpot_s=0.5)
    assert summary["statuses"]["ok"] == 1 and summary["goodput"]["met"] == 1
    assert summary["throughput_output_tok_s"] == pytest.approx(4 / 4.5, abs=EXACT)


def test_two_requests_contend_for_blocks_and_the_later_is_preempted_then_recomputed():
    # 4 blocks of 16 tokens; each request needs 2 for its 30-token prompt and a third
    # at its 33rd token. Both decode from t=1; at t=3 A needs a block: B is preempted.
    # B's first block stays cached until A takes it at t=19, so B waits (its 3 blocks
    # never fit beside A) and recomputes all 33 tokens once A ends at t=20.
    trace = [TraceRequest(0, 0.0, 30, 20), TraceRequest(1, 0.0, 30, 20)]
    result, sim = simulate(trace, num_blocks=4)
    assert times(result) == {"r0": (1.0, 20.0, 20), "r1": (1.0, 37.0, 20)}
    assert result.workers["yard-w0"]["preemptions"] == 1
    assert result.workers["yard-w0"]["steps"] == 20 + 17
    engine = sim.workers["yard-w0"].engine
    assert engine.blocks.num_free_blocks == 4 and not engine.requests  # nothing leaked


def test_a_forced_migration_moves_a_request_in_two_stages_and_it_finishes_on_the_destination():
    # Ordered at 2.5; the source starts it between steps at 3, the destination
    # reserves at once; stage 1 (2 full blocks) at 4, copied by 4.25, the reservation
    # grows; at 5 one block is left: pause, copy it by 5.25, commit, and decode on
    # from 5.25 one token a second: tokens 5..9 end at 6.25 .. 10.25.
    trace = [TraceRequest(0, 0.0, 30, 10)]
    result, sim = simulate(trace, workers=2, setup=lambda s: s.migrate_at(2.5, "r0", "yard-w0", "yard-w1"))
    (record,) = result.requests
    assert (record.first_token_s, record.finished_s, record.output_tokens) == (1.0, pytest.approx(10.25, abs=EXACT), 10)
    assert record.workers == ["yard-w0", "yard-w1"]
    (move,) = result.migrations
    assert (move.reason, move.outcome, move.stages, move.blocks) == ("manual", "committed", 2, 3)
    assert (move.started_s, move.ended_s) == (2.5, 5.25)
    assert result.workers["yard-w0"]["migrated_out"] == 1 and result.workers["yard-w1"]["migrated_in"] == 1
    for worker in sim.workers.values():  # the source's pinned blocks are back
        assert worker.engine.blocks.num_free_blocks == 64


def test_a_migration_of_a_request_that_finishes_first_is_aborted_and_frees_every_block():
    trace = [TraceRequest(0, 0.0, 30, 3)]
    result, sim = simulate(trace, workers=2, setup=lambda s: s.migrate_at(1.5, "r0", "yard-w0", "yard-w1"))
    assert times(result) == {"r0": (1.0, 3.0, 3)}
    (move,) = result.migrations
    assert move.outcome == "aborted" and move.error.startswith("finished")
    assert [w.engine.blocks.num_free_blocks for w in sim.workers.values()] == [64, 64]


def pd_cluster(streaming: bool) -> dict[str, Any]:
    return {"pools": {"prefill": PoolConfig(1), "decode": PoolConfig(1)}, "handoff_streaming": streaming}


@pytest.mark.parametrize("streaming, copied_s", [(False, 0.25 + 2 * 0.5), (True, 0.25 + 0.5)])
def test_a_prefill_worker_hands_the_request_to_its_decode_worker_after_the_first_token(streaming, copied_s):
    # Streaming leaves only the prompt's last block to copy after the first token.
    step = dataclasses.replace(timing(), kv_block_bytes=2, transfer_bytes_per_s=4.0)  # 0.5 s per block
    trace = [TraceRequest(0, 0.0, 20, 3)]
    result, _ = simulate(trace, workers=0, step=step, **pd_cluster(streaming))
    (record,) = result.requests
    assert record.workers == ["yard-w0", "yard-w1"]  # the prefill pool's worker first
    (handoff,) = result.migrations
    assert (handoff.reason, handoff.outcome, handoff.stages, handoff.blocks) == ("handoff", "committed", 1, 2)
    assert handoff.ended_s == pytest.approx(1.0 + copied_s, abs=EXACT)
    # then two decode steps on the decode worker
    assert record.finished_s == pytest.approx(1.0 + copied_s + 2.0, abs=EXACT)


def test_a_flooded_worker_sheds_its_load_to_the_other_by_the_balance_rule():
    migration = {"enabled": True, "interval_s": 0.5, "balance_threshold": 1.0, "request_cooldown_s": 100.0}
    config = ClusterConfig.from_dict({"num_workers": 2, "migration": migration, "engine": {"num_kv_blocks": 16}})
    trace = [TraceRequest(i, 0.1 * i, 40, 40) for i in range(4)]
    result = Simulation(config, RouterConfig(policy="flood"), timing(base_s=0.1), trace).run()
    assert all(r.status == "ok" and r.output_tokens == 40 for r in result.requests)
    moved = [m for m in result.migrations if m.outcome == "committed"]
    assert moved and {m.reason for m in moved} == {"balance"}
    assert {(m.source, m.destination) for m in moved} == {("yard-w0", "yard-w1")}
    assert result.workers["yard-w1"]["migrated_in"] == len(moved)


def test_requests_the_router_refuses_are_counted_and_never_reach_a_worker():
    trace = [TraceRequest(0, 0.0, 5000, 4), TraceRequest(1, 0.0, 10, 4)]
    result, _ = simulate(trace)
    assert [r.status for r in result.requests] == ["too_long", "ok"]
    assert result.requests[0].workers == []


def test_a_serve_config_names_its_bad_section_and_an_unknown_policy_the_known_ones(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("cluster: {num_workers: 2}\nrouterz: {}\n")
    with pytest.raises(ValueError, match=r"unknown serve config sections \['routerz'\]"):
        load_sim_config(bad)
    bad.write_text("router: {policy: fastest}\n")
    with pytest.raises(ValueError, match=r"policy must be one of \['round_robin', 'power_of_two', 'least_load'"):
        load_sim_config(bad)


def test_a_step_time_model_refuses_a_block_size_the_engine_does_not_use():
    config = ClusterConfig(engine=EngineConfig(block_size=32, num_kv_blocks=8), num_workers=1)
    with pytest.raises(ValueError, match="block_size 32 differs from the step-time model's 16"):
        Simulation(config, RouterConfig(policy="round_robin", block_size=32), timing(), [TraceRequest(0, 0, 5, 5)])


def test_the_simulation_gives_the_same_results_twice():
    trace = [TraceRequest(i, 0.05 * i, 20 + 7 * i, 5 + i) for i in range(30)]
    runs = [simulate(trace, workers=3, num_blocks=24, policy="power_of_two", step=timing(0.01, 0.001))[0]
            for _ in range(2)]
    assert [r.row() for r in runs[0].requests] == [r.row() for r in runs[1].requests]
    assert SimOptions().seed == 0


def test_a_sweep_finds_the_fewest_workers_that_meet_the_slos():
    from cluster.sim.sweep import Layout, layouts_upto, sweep

    # A request every 0.25 s needing 0.5 s of prefill (10 tokens at 0.045 s, 0.05 s a
    # step): two workers are saturated, three keep up; so do two prefill workers.
    step = timing(base_s=0.05, prefill_token_s=0.045)
    trace = [TraceRequest(i, 0.25 * i, 10, 2) for i in range(40)]
    base = ClusterConfig(engine=EngineConfig(num_kv_blocks=64), num_workers=1)
    router = RouterConfig(policy="least_load")
    best, rows = sweep(base, router, step, trace, slo_ttft_s=1.5, slo_tpot_s=1.0, attainment=1.0, max_workers=8)
    # A tie on size and goodput with 2P:1D: the colocated layout.
    assert best is not None and best.layout == Layout(mixed=3)
    assert Layout(prefill=2, decode=1) in [r.layout for r in rows]
    assert len(rows) < len(layouts_upto(8))  # a search, not every layout
    # Checked against every smaller layout, simulated here:
    for layout in layouts_upto(2):
        summary = Simulation(layout.apply(base), router, step, trace).run().summary(1.5, 1.0)
        assert summary["goodput"]["fraction"] < 1.0, layout
    none, tried = sweep(base, router, step, trace, 1.5, 1.0, 1.0, max_workers=2)
    assert none is None and {r.layout for r in tried} == set(layouts_upto(2))


def test_a_simulation_that_cannot_finish_stops_at_its_time_limit_and_says_so():
    trace = [TraceRequest(0, 0.0, 10, 100), TraceRequest(1, 50.0, 10, 5)]
    config = ClusterConfig(engine=EngineConfig(num_kv_blocks=64), num_workers=1)
    result = Simulation(config, RouterConfig(policy="round_robin"), timing(), trace,
                        SimOptions(max_simulated_s=30.0)).run()
    assert [r.status for r in result.requests] == ["unfinished", "unfinished"]
    assert result.requests[0].output_tokens == 30 and result.end_s == 30.0  # a token a second from 1 s
    assert result.summary()["statuses"]["unfinished"] == 2
