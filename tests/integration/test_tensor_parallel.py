"""Tensor parallelism across Ray actors (gloo on CPU) against TP=1."""

from __future__ import annotations

import random
import time

import pytest
import torch

from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.kv_transport import ObjectStoreTransport

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
# Chunked prefill (small token budget) and prefix caching stay on.
ENGINE_ARGS = dict(max_num_batched_tokens=32, enable_prefix_caching=True, tp_cpus_per_rank=0.5,
                   tp_timeout_s=20.0)


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(4, 1000) for _ in range(34)]  # two full blocks cached
    return [shared + [rng.randrange(4, 1000) for _ in range(n)] for n in (3, 29)] + \
           [[rng.randrange(4, 1000) for _ in range(n)] for n in (7, 50)]


def run_twice(llm: LLM) -> list:
    """Generate, then again: the second pass hits the prefix cache."""
    first = llm.generate(prompts(), PARAMS)
    second = llm.generate(prompts(), PARAMS)
    assert llm.engine.blocks.prefix_hit_tokens > 0
    return first + second


@pytest.fixture(scope="module")
def reference(make_model):
    return {kind: run_twice(LLM(model=str(make_model(kind)), **ENGINE_ARGS))
            for kind in ("tiny-llama", "tiny-moe")}


@pytest.mark.parametrize("kind", ["tiny-llama", "tiny-moe"])
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1(ray_local, make_model, reference, kind, tp):
    # tiny-moe has 2 KV heads: at TP=4 each is replicated on two ranks.
    with LLM(model=str(make_model(kind)), tensor_parallel_size=tp, **ENGINE_ARGS) as llm:
        outs = run_twice(llm)
        assert llm.engine.runner.kv_caches.shape[4] == max(1, llm.engine.model_config.num_kv_heads // tp)
    for got, want in zip(outs, reference[kind]):
        assert got.token_ids == want.token_ids
        for a, b in zip(got.logprobs, want.logprobs):
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top_logprobs, b.top_logprobs)) <= 1e-4


def test_migration_between_two_tp2_instances_goes_rank_to_rank(ray_local, make_model):
    config = EngineConfig(model=str(make_model("tiny-llama")), tensor_parallel_size=2, block_size=8,
                          **ENGINE_ARGS)
    tokens = prompts()[1]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    undisturbed = LLM(model=config.model).generate([tokens], params)[0].token_ids
    transport = ObjectStoreTransport()
    # Two TP=2 instances side by side on one node: their own stores, ports, groups.
    source, dest = LLMEngine(config), LLMEngine(config)
    try:
        assert source.executor.group.store.port != dest.executor.group.store.port
        dest.add_request("other", prompts()[2], params)  # dest's block ids differ from the source's
        dest.step()
        source.add_request("r", tokens, params)
        sent: list[int] = []
        while len(sent) < 9:
            for out in source.step():
                sent.extend(out.new_token_ids)
        dest.reserve_migration("m", "r", source.start_migration("m", "r"))
        step = source.advance_migration("m", 1 << 20)  # pause at once: one stage
        payload = transport.send(source, step.stage.block_ids)
        assert len(payload.shards) == 2  # one object per rank, none gathered on rank 0
        transport.receive(dest, "m", 0, payload)
        dest_ids = dest.destination._by_id["m"].block_ids[:len(step.stage.block_ids)]
        assert list(dest_ids) != list(step.stage.block_ids)
        for rank in range(2):
            got = read_shard(ray_local, dest, rank, dest_ids)
            want = read_shard(ray_local, source, rank, step.stage.block_ids)
            assert got.shape[4] == source.model_config.num_kv_heads // 2  # this rank's KV heads only
            assert torch.equal(got, want), f"rank {rank}"
        dest.commit_migration("m", step.state)
        assert source.complete_migration("m") == len(sent)
        rest: list[int] = []
        while "r" in dest.requests:
            for out in dest.step():
                if out.request_id == "r":
                    assert out.start_index == len(sent) + len(rest)
                    rest.extend(out.new_token_ids)
        assert sent + rest == undisturbed
        assert source.blocks.num_free_blocks == source.blocks.num_blocks
    finally:
        source.shutdown()
        dest.shutdown()


def read_shard(ray, engine: LLMEngine, rank: int, block_ids) -> "torch.Tensor":
    if rank == 0:
        return engine.read_kv(list(block_ids))
    return ray.get(engine.tp_ranks[rank - 1].read_shard.remote(list(block_ids)))


def test_killed_rank_fails_in_flight_requests_within_timeout(ray_local, make_model):
    engine = LLMEngine(EngineConfig(model=str(make_model("tiny-llama")), tensor_parallel_size=2,
                                    **{**ENGINE_ARGS, "tp_timeout_s": 10.0}))
    try:
        for i in range(3):
            engine.add_request(f"r{i}", prompts()[i], PARAMS)
        engine.step()
        ray_local.kill(engine.executor.ranks[0])
        start = time.monotonic()
        failed = []
        # Each step waits at most tp_timeout_s on the dead rank: the requests fail
        # instead of hanging (the deadline only stops a broken run).
        while engine.has_unfinished_requests() and time.monotonic() - start < 120:
            failed.extend(o for o in engine.step() if o.finish_reason == "error")
        assert sorted(o.request_id for o in failed) == ["r0", "r1", "r2"]
        assert all("tensor-parallel collective failed" in o.error for o in failed)
        assert not engine.healthy
        with pytest.raises(RuntimeError, match="engine is unhealthy"):
            engine.add_request("late", [1, 2, 3], PARAMS)
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    finally:
        engine.shutdown()


def test_a_second_instance_waits_for_nothing_and_a_closed_one_frees_its_cpus(ray_local, make_model):
    a, b = str(make_model("tiny-llama")), str(make_model("tiny-qwen2"))
    # Two ranks that take most of the free CPUs: a second such instance cannot fit.
    per_rank = round(ray_local.available_resources()["CPU"] * 0.4, 2)
    args = dict(tensor_parallel_size=2, tp_cpus_per_rank=per_rank, tp_timeout_s=20.0)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = LLM(model=a, **args)
    assert len(first.generate([[5, 6, 7]], greedy)[0].token_ids) == 4
    # At once ("cannot place"), not after the timeout ("could not place within").
    with pytest.raises(RuntimeError, match=r"cannot place its 2 ranks.*CPU.*free.*LLM.close") as info:
        LLM(model=b, **args)
    assert f"{per_rank:g}" in str(info.value)
    first.close()
    with LLM(model=b, **args) as second:  # the closed one's CPUs are free again
        assert len(second.generate([[5, 6, 7]], greedy)[0].token_ids) == 4
    dropped = LLM(model=a, **args)
    del dropped  # never closed: collected, it still releases its ranks
    third = LLM(model=b, **args)
    third.close()
