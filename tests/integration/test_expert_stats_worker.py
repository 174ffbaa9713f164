"""A MoE worker's routing statistics through its `experts` call and `yard experts`:
every token it computed counted once per layer and choice, the hottest experts those
transformers' routing gives, and a dense worker refused by name."""

from __future__ import annotations

import pytest
from conditions import wait_until
from worker_streams import prompt, start, tokens

from cluster.cli import main
from tests.integration.test_routing_stats import reference_routing
from workers import SamplingParams
from workers.events import WorkerRequest
from workers.experts.stats import RoutingStats

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_worker(ray_local, make_model):
    model_dir = str(make_model("tiny-moe-affinity"))
    actor = start(ray_local, "w-moe", model_dir)
    yield actor, model_dir
    ray_local.get(actor.shutdown.remote())
    ray_local.kill(actor)


def generate(ray, worker, request: WorkerRequest) -> list[int]:
    return tokens([e for ref in worker.generate.remote(request) for e in ray.get(ref)])


def test_the_worker_counts_every_computed_token_and_yard_experts_prints_it(ray_local, moe_worker, capsys):
    worker, model_dir = moe_worker
    prompts = [prompt(1, 30), prompt(2, 20)]
    outputs = [generate(ray_local, worker, WorkerRequest(f"r{i}", p, GREEDY)) for i, p in enumerate(prompts)]
    # Computed: each prompt, then each generated token but the last (sampled, never fed back).
    computed = [list(p) + out[:-1] for p, out in zip(prompts, outputs)]
    forwarded = sum(map(len, computed))
    stats = wait_until(lambda: (s := ray_local.get(worker.experts.remote())) and sum(s["loads"][0]) == 2 * forwarded
                       and s, timeout_s=30, what="the counts of both requests taken into the window")
    assert (stats["num_layers"], stats["num_experts"], stats["top_k"], stats["table"]) == (6, 16, 2, None)
    assert [sum(row) for row in stats["loads"]] == [2 * forwarded] * 6
    assert [sum(map(sum, m)) for m in stats["transitions"]] == [2 * forwarded] * 5
    reference = sum((RoutingStats.count(reference_routing(model_dir, [seq], top_k=2), 16) for seq in computed),
                    RoutingStats.empty(6, 16))
    hottest = [max(range(16), key=row.__getitem__) for row in reference.loads]
    assert [max(range(16), key=row.__getitem__) for row in stats["loads"]] == hottest

    assert main(["experts", "w-moe"]) == 0
    printed = capsys.readouterr().out
    assert "worker w-moe: 6 MoE layers x 16 experts" in printed and f"{2 * forwarded:>10}" in printed
    assert main(["experts", "w-moe", "--json"]) == 0
    assert '"top_k": 2' in capsys.readouterr().out


def test_yard_experts_names_a_missing_worker_and_a_dense_one(ray_local, make_model, capsys):
    assert main(["experts", "w-nope"]) == 1
    assert "no worker 'w-nope' is running" in capsys.readouterr().out
    dense = start(ray_local, "w-dense", str(make_model("tiny-llama")))
    try:
        assert main(["experts", "w-dense"]) == 2
        assert "w-dense's model (LlamaForCausalLM) has no experts" in capsys.readouterr().out
    finally:
        ray_local.get(dense.shutdown.remote())
        ray_local.kill(dense)


def test_an_expert_parallel_worker_reports_its_dispatch_and_re_places_live(ray_local, make_model, moe_worker,
                                                                           capsys):
    model_dir = str(make_model("tiny-moe-affinity"))
    worker = start(ray_local, "w-ep", model_dir, tensor_parallel_size=2, expert_parallel_size=2,
                   expert_slots_per_rank=10, tp_cpus_per_rank=0.5, tp_timeout_s=20.0)
    try:
        prompts = [prompt(3, 40), prompt(4, 25)]
        before = [generate(ray_local, worker, WorkerRequest(f"a{i}", p, GREEDY)) for i, p in enumerate(prompts)]
        forwarded = sum(len(p) + len(out) - 1 for p, out in zip(prompts, before))
        stats = wait_until(lambda: (s := ray_local.get(worker.experts.remote())) and s["dispatched"][0] == 2 * forwarded
                           and s, timeout_s=30, what="the dispatch counts of both requests")
        assert stats["dispatched"] == [2 * forwarded] * 6
        assert all(0 < c < 2 * forwarded for c in stats["cross_rank"])
        assert all(0 < b <= 1 for b in stats["balancedness"])
        assert stats["table"]["num_ranks"] == 2 and len(stats["table"]["slots"][0]) == 20
        assert (stats["moving"], stats["replacements"]) == (False, [])

        assert main(["experts", "w-ep", "--replace", "--policy", "balanced"]) == 0
        assert "re-placement by balanced begun" in capsys.readouterr().out
        done = wait_until(lambda: (s := ray_local.get(worker.experts.remote()))["replacements"] and s,
                          timeout_s=30, what="the re-placement's end")
        [result] = done["replacements"]
        assert result["outcome"] == "done" and result["layers_moved"] >= 1, result
        assert done["table"] != stats["table"] and not done["moving"]
        assert main(["experts", "w-ep"]) == 0
        printed = capsys.readouterr().out
        assert "placement: 2 ranks x 10 slots" in printed and "re-placement done:" in printed
        # The same prompts again, on the new placement: the same tokens.
        after = [generate(ray_local, worker, WorkerRequest(f"b{i}", p, GREEDY)) for i, p in enumerate(prompts)]
        assert after == before
    finally:
        ray_local.get(worker.shutdown.remote())
        ray_local.kill(worker)
    # Without expert parallelism there is nothing to re-place: named, not a crash.
    dense_moe, _ = moe_worker
    with pytest.raises(ray_local.exceptions.RayTaskError, match="w-moe runs without expert parallelism"):
        ray_local.get(dense_moe.replace_experts.remote())


def test_expert_replacement_every_n_steps_runs_by_itself(ray_local, make_model):
    worker = start(ray_local, "w-ep-auto", str(make_model("tiny-moe-affinity")), tensor_parallel_size=2,
                   expert_parallel_size=2, tp_cpus_per_rank=0.5, tp_timeout_s=20.0,
                   expert_replacement_every_steps=6, expert_replacement_policy="affinity")
    try:
        first = generate(ray_local, worker, WorkerRequest("auto", prompt(5, 30), GREEDY))
        stats = wait_until(lambda: (s := ray_local.get(worker.experts.remote()))["replacements"] and s,
                           timeout_s=30, what="a re-placement begun by the worker itself")
        assert stats["replacements"][0]["outcome"] == "done"
        # Tokens do not change with the placement.
        assert generate(ray_local, worker, WorkerRequest("again", prompt(5, 30), GREEDY)) == first
    finally:
        ray_local.get(worker.shutdown.remote())
        ray_local.kill(worker)
