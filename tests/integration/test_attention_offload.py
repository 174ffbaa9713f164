"""Attention offloading against the same engine without it (itself held to
transformers): decode and prefill attention on K attention workers that hold the KV
cache by KV head, the dense layers here. Same greedy tokens, logprobs within 1e-4,
through chunked prefill, prefix-cache hits and preemption; exactly the traffic the
theory gives; decode steps in ping-pong micro-batches; a dead attention worker fails
the requests clearly."""

from __future__ import annotations

import random

import pytest

from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
# Chunked prefill (a small token budget) and prefix caching on; few KV blocks, so that
# the longest requests preempt the others and recompute.
ENGINE_ARGS = dict(max_num_batched_tokens=32, enable_prefix_caching=True, block_size=8, num_kv_blocks=40)
MODEL = "tiny-llama"  # 8 heads, 4 KV heads, hidden 256


def prompts() -> list[list[int]]:
    rng = random.Random(21)
    shared = [rng.randrange(4, 1000) for _ in range(34)]  # cached after the first pass
    return [shared + [rng.randrange(4, 1000) for _ in range(n)] for n in (3, 45)] + \
           [[rng.randrange(4, 1000) for _ in range(n)] for n in (9, 70, 1, 30)]


def run_twice(llm: LLM) -> list:
    outs = llm.generate(prompts(), PARAMS) + llm.generate(prompts(), PARAMS)
    assert llm.engine.blocks.prefix_hit_tokens > 0
    assert llm.engine.scheduler.num_preemptions > 0
    return outs


@pytest.fixture(scope="module")
def reference(make_model):
    with LLM(model=str(make_model(MODEL)), **ENGINE_ARGS) as llm:
        return run_twice(llm)


@pytest.mark.parametrize("workers, micro_batches", [(1, 2), (2, 1), (2, 2)])
def test_offloaded_attention_matches_the_plain_engine(ray_local, make_model, reference, workers, micro_batches):
    offload = {"workers": workers, "micro_batches": micro_batches, "cpus_per_worker": 0.5}
    with LLM(model=str(make_model(MODEL)), attention_offload=offload, **ENGINE_ARGS) as llm:
        got = run_twice(llm)
        runner = llm.engine.runner
        assert runner.kv_caches.numel() == 0  # no KV on the model worker
        traffic = runner.offload.traffic
    for a, b in zip(got, reference, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top_logprobs, y.top_logprobs)) <= 1e-4
    # Per token and layer: q and the new k, v out; the attention output back (float32).
    hidden, kv = 256, 4 * 32
    assert traffic.bytes_out == traffic.tokens * (hidden + 2 * kv) * 4
    assert traffic.bytes_in == traffic.tokens * hidden * 4
    if micro_batches == 1:
        assert traffic.layer_calls == traffic.steps * 4  # every layer of every forward
    else:  # decode steps went in two turns per layer
        assert traffic.steps * 4 < traffic.layer_calls <= traffic.steps * 4 * 2


def test_a_dead_attention_worker_fails_the_requests_clearly(ray_local, make_model):
    engine = LLMEngine(EngineConfig(model=str(make_model(MODEL)), tp_timeout_s=10.0,
                                    attention_offload={"workers": 2, "cpus_per_worker": 0.5}, **ENGINE_ARGS))
    try:
        for i, tokens in enumerate(prompts()[:3]):
            engine.add_request(f"r{i}", tokens, PARAMS)
        engine.step()
        ray_local.kill(engine.offload.workers[1])
        ended = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    ended[out.request_id] = (out.finish_reason, out.error)
        assert set(ended) == {"r0", "r1", "r2"}
        assert all(reason == "error" and "attention worker failed" in error for reason, error in ended.values())
        assert not engine.healthy
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # no block leaks
    finally:
        engine.shutdown()


@pytest.mark.parametrize("offload, others, match", [
    ({"workers": 3}, {}, r"attention_offload.workers 3 must divide the model's 4 KV heads"),
    ({"workers": 2, "micro_batches": 0}, {}, r"attention_offload.micro_batches must be an integer >= 1, got 0"),
    ({"workers": 0}, {}, r"attention_offload.workers must be an integer >= 1, got 0"),
    ({"workers": 1, "gpus": 1}, {}, r"attention_offload has unknown keys \['gpus'\]"),
    ({"workers": 1}, {"tensor_parallel_size": 2}, r"attention_offload with tensor_parallel_size 2"),
])
def test_bad_offload_settings_are_refused_naming_the_value(ray_local, make_model, offload, others, match):
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(model=str(make_model(MODEL)), attention_offload=offload, **others))
