"""Expert parallelism (EP=N over the tensor-parallel ranks, all-to-all over gloo)
against EP=1, which test_logits_vs_hf.py holds to transformers' Mixtral: the same
greedy tokens and logprobs within 1e-4, for each placement policy and with replicas."""

from __future__ import annotations

import json
import random

import pytest

from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.experts.policies import PlacementShape, place_experts

PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
# Chunked prefill (a small token budget) and prefix caching stay on.
ENGINE_ARGS = dict(max_num_batched_tokens=32, enable_prefix_caching=True, tp_cpus_per_rank=0.5,
                   tp_timeout_s=20.0)
MODEL = "tiny-moe-affinity"  # 16 experts, 6 layers, top-2, skewed and correlated routing


def prompts() -> list[list[int]]:
    rng = random.Random(5)
    shared = [rng.randrange(7, 1000) for _ in range(34)]  # two full blocks cached
    return [shared + [rng.randrange(7, 1000) for _ in range(n)] for n in (3, 29)] + \
           [[rng.randrange(7, 1000) for _ in range(n)] for n in (9, 61, 1)]


def run_twice(llm: LLM) -> list:
    """Generate, then again: the second pass hits the prefix cache."""
    outs = llm.generate(prompts(), PARAMS) + llm.generate(prompts(), PARAMS)
    assert llm.engine.blocks.prefix_hit_tokens > 0
    return outs


@pytest.fixture(scope="module")
def reference(make_model):
    """EP=1 outputs, and the routing statistics they produced (for the policies)."""
    with LLM(model=str(make_model(MODEL)), **ENGINE_ARGS) as llm:
        outs = run_twice(llm)
        return outs, llm.engine.runner.model.routing.take()


def assert_same_outputs(got: list, want: list) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top_logprobs, y.top_logprobs)) <= 1e-4


@pytest.mark.parametrize("ep, policy, slots_per_rank", [
    (2, "contiguous", None),
    (4, "contiguous", None),
    (2, "balanced", 10),  # 25% redundant slots: replicas of hot experts
    (4, "affinity", None),
    (4, "combined", 5),
])
def test_expert_parallel_matches_ep1(ray_local, make_model, reference, tmp_path, ep, policy, slots_per_rank):
    want, stats = reference
    placement = "contiguous"
    if policy != "contiguous":
        table = place_experts(policy, stats, PlacementShape(ep, slots_per_rank or 16 // ep))
        if slots_per_rank:
            assert max(table.replica_counts(0)) > 1
        placement = str(tmp_path / "table.json")
        (tmp_path / "table.json").write_text(json.dumps(table.to_dict()))
    with LLM(model=str(make_model(MODEL)), tensor_parallel_size=ep, expert_parallel_size=ep,
             expert_placement=placement, **ENGINE_ARGS) as llm:
        got = run_twice(llm)
        model, engine = llm.engine.runner.model, llm.engine
        moved = model.dispatch_counts.take()
        assert model.layers[0].mlp.w13.shape[0] == (slots_per_rank or 16 // ep)  # whole experts, own slots
    assert_same_outputs(got, want)
    # Every (token, choice) pair of every forward went through the all-to-all, once.
    for layer in moved:
        assert sum(map(sum, layer)) == 2 * engine._computed_tokens
        assert sum(layer[r][r] for r in range(ep)) < sum(map(sum, layer))  # some crossed ranks


@pytest.mark.parametrize("args, match", [
    (dict(tensor_parallel_size=4, expert_parallel_size=2), r"expert_parallel_size must be 1 or tensor_parallel_size \(4\).*got 2"),
    (dict(tensor_parallel_size=2, expert_parallel_size=2, expert_slots_per_rank=5),
     r"2 ranks x 5 slots cannot hold 16 experts"),
    (dict(tensor_parallel_size=2, expert_parallel_size=2, expert_placement="no/such/table.json"),
     r"expert_placement must be 'contiguous' or a placement table's JSON file; 'no/such/table.json'"),
])
def test_bad_expert_parallel_settings_are_refused_naming_the_value(make_model, args, match):
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(model=str(make_model(MODEL)), **args))


def test_expert_parallelism_on_a_dense_model_is_refused(make_model):
    with pytest.raises(ValueError, match=r"expert_parallel_size 2 needs a mixture-of-experts model"):
        LLMEngine(EngineConfig(model=str(make_model("tiny-llama")), tensor_parallel_size=2, expert_parallel_size=2))


@pytest.mark.parametrize("slots, match", [
    ([[e % 16 for e in range(16)]] * 5, r"table has 5 layers of 16 experts; the model has 6 layers of 16"),
    ([list(range(15)) + [16]] * 6, r"layer 0 slot 15 names expert 16; the model has experts 0..15"),
    ([list(range(15)) + [14]] * 6, r"layer 0 places no slot for experts \[15\]"),
    ([list(range(16)) + [0]] * 6, r"expert_parallel_size 2 does not divide the 17 expert slots"),
])
def test_a_bad_placement_table_is_refused_naming_the_value(make_model, tmp_path, slots, match):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"num_experts": 16, "num_ranks": 2, "slots": slots}))
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(model=str(make_model(MODEL)), tensor_parallel_size=2, expert_parallel_size=2,
                               expert_placement=str(path)))
