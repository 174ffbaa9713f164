"""Decode runs (cluster/sim/decode_run.py) change how fast the simulator runs, not
what it finds: random workloads, with preemptions, migrations, P/D handoffs and
prefix sharing, give identical records either way."""

from __future__ import annotations

import random

import pytest

from cluster.config import ClusterConfig
from cluster.sim.cluster import SimOptions, Simulation
from cluster.sim.step_time import StepTimeModel
from cluster.sim.trace import TraceRequest
from router.config import RouterConfig

STEP = StepTimeModel(0.0071, 1.3e-4, 2.1e-8, 3.7e-4, 9.1e-7, kv_block_bytes=65536, max_position_embeddings=4096,
                     transfer_bytes_per_s=3.3e8, transfer_latency_s=0.0013)


def workload(seed: int, n: int, rate: float, shared: bool) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = rng.randrange(5, 400)
        hashes = tuple(rng.randrange(3) for _ in range(prompt // 64)) if shared else ()
        out.append(TraceRequest(i, t, prompt, rng.randrange(2, 160), hashes, 64))
    return out


def both(config: ClusterConfig, router: RouterConfig, trace: list[TraceRequest]) -> tuple:
    runs = [Simulation(config, router, STEP, trace, SimOptions(decode_runs=on)).run() for on in (False, True)]
    step_by_step, with_runs = runs
    assert with_runs.events < step_by_step.events, "the runs must have been used"
    return step_by_step, with_runs


CASES = ["mixed", "migration", "pd", "prefix"]


@pytest.mark.parametrize("case", CASES)
def test_decode_runs_give_the_same_results_as_step_by_step(case):
    cluster = {"num_workers": 3, "engine": {"num_kv_blocks": 90, "max_num_batched_tokens": 256}}
    policy = "least_load"
    if case == "migration":
        cluster["migration"] = {"enabled": True, "interval_s": 0.25, "balance_threshold": 1.0}
        policy = "round_robin"
    if case == "pd":
        cluster = {**cluster, "num_workers": 0, "pools": {"prefill": {"num_workers": 1},
                                                           "decode": {"num_workers": 2}}}
    if case == "prefix":
        policy = "prefix_aware"
    # A seed of its own per case, the same in every process (hash() of a str is not).
    trace = workload(100 + CASES.index(case), 160, 9.0, shared=case == "prefix")
    a, b = both(ClusterConfig.from_dict(cluster), RouterConfig(policy=policy), trace)
    assert [r.row() for r in a.requests] == [r.row() for r in b.requests]
    assert a.migrations == b.migrations and a.samples == b.samples
    assert a.workers == b.workers
    assert sum(w["preemptions"] for w in a.workers.values()) > 0 or case in ("pd", "prefix")
    if case in ("migration", "pd"):
        assert any(m.outcome == "committed" for m in a.migrations)
