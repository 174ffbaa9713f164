"""Attention offloading against the same engine without it (itself held to
transformers): decode and prefill attention on K attention workers that hold the KV
cache by KV head, the dense layers here. Same greedy tokens, logprobs within 1e-4,
through chunked prefill, prefix-cache hits and preemption; exactly the traffic the
theory gives; decode steps in ping-pong micro-batches; tensor parallelism; requests
migrated and handed off to and from offloading workers; a dead attention worker fails
the requests clearly."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import worker_streams
from conditions import wait_until
from test_migration_engine import Run, busy_destination, migrate, undisturbed
from test_migration_engine import prompt as migration_prompt

from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.events import WorkerRequest

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


def timed_stats(engine: LLMEngine):
    """The offload stats once every attention worker's compute time has been polled."""
    stats = engine.offload_stats()
    return stats if min(stats.attention_s) > 0 else None


@pytest.fixture(scope="module")
def reference(make_model):
    with LLM(model=str(make_model(MODEL)), **ENGINE_ARGS) as llm:
        return run_twice(llm)


@pytest.mark.parametrize("workers, micro_batches, tp", [(1, 2, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2)])
def test_offloaded_attention_matches_the_plain_engine(ray_local, make_model, reference, workers, micro_batches, tp):
    """With tp = 2, each rank sends its heads to one attention worker of its own."""
    offload = {"workers": workers, "micro_batches": micro_batches, "cpus_per_worker": 0.5}
    with LLM(model=str(make_model(MODEL)), attention_offload=offload, tensor_parallel_size=tp,
             tp_cpus_per_rank=0.5, **ENGINE_ARGS) as llm:
        got = run_twice(llm)
        runner = llm.engine.runner
        assert runner.kv_caches.numel() == 0  # no KV on the model worker
        traffic = runner.offload.traffic
        # Metrics: every attention worker computed; each holds its KV heads' shard of
        # all 40 blocks (4 layers, K and V, 8 slots, 4 / workers heads of 32 floats).
        stats = wait_until(lambda: timed_stats(llm.engine), 10, "the attention workers' compute times")
        assert stats.kv_bytes_total == (40 * 4 * 2 * 8 * (4 // workers) * 32 * 4,) * (workers // tp)
        assert stats.kv_bytes_used == (0,) * (workers // tp)  # all requests ended
        assert 0 < traffic.blocked_s < traffic.forward_s and traffic.blocked_s <= traffic.exchange_s
    for a, b in zip(got, reference, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top_logprobs, y.top_logprobs)) <= 1e-4
    # Per token and layer: q and the new k, v out; the attention output back (float32);
    # rank 0's heads with tp = 2.
    hidden, kv = 256 // tp, 4 * 32 // tp
    assert traffic.bytes_out == traffic.tokens * (hidden + 2 * kv) * 4
    assert traffic.bytes_in == traffic.tokens * hidden * 4
    if micro_batches == 1:
        assert traffic.layer_calls == traffic.steps * 4  # every layer of every forward
    else:  # decode steps went in two turns per layer
        assert traffic.steps * 4 < traffic.layer_calls <= traffic.steps * 4 * 2


@pytest.mark.parametrize("noticed", [False, True], ids=["at-once", "after-it-died"])
def test_a_dead_attention_worker_fails_the_requests_clearly(ray_local, make_model, noticed):
    """Killed just before a step (the step's layout or a layer's exchange fails), or
    seen dead first (the layout's broadcast fails): either way the error names it."""
    engine = LLMEngine(EngineConfig(model=str(make_model(MODEL)), tp_timeout_s=10.0,
                                    attention_offload={"workers": 2, "cpus_per_worker": 0.5}, **ENGINE_ARGS))
    try:
        for i, tokens in enumerate(prompts()[:3]):
            engine.add_request(f"r{i}", tokens, PARAMS)
        engine.step()
        ray_local.kill(engine.offload.workers[1])
        if noticed:
            wait_until(engine.offload.check_workers, 30, "the killed attention worker's loop to end")
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
    ({"workers": 1}, {"tensor_parallel_size": 2}, r"attention_offload.workers 1 must be a multiple of "
                                                  r"tensor_parallel_size 2"),
    ({"workers": 2}, {"tensor_parallel_size": 2, "expert_parallel_size": 2},
     r"attention_offload with expert_parallel_size 2"),
])
def test_bad_offload_settings_are_refused_naming_the_value(ray_local, make_model, offload, others, match):
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(model=str(make_model(MODEL)), attention_offload=offload, **others))


def test_a_request_migrates_off_an_offloading_worker_and_back_exactly(ray_local, make_model):
    """Offloading (K=2) → plain → offloading (K=1): the KV leaves and enters through the
    attention workers, looks the same as a plain worker's, and the request ends with
    the tokens of an undisturbed run. Each destination holds other requests' blocks,
    so block ids differ on the two sides of each move."""
    model = str(make_model(MODEL))
    plain = EngineConfig(model=model, block_size=8, num_kv_blocks=64)
    offloading = [dataclasses.replace(plain, tp_timeout_s=30.0, attention_offload={"workers": k, "cpus_per_worker": 0.5})
                  for k in (2, 1)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    tokens = migration_prompt(5, 45)
    want = undisturbed(plain, tokens, params)
    engines = [LLMEngine(offloading[0]), busy_destination(plain), busy_destination(offloading[1])]
    try:
        source, middle, last = engines
        source.add_request("moving", tokens, params)
        run = Run()
        while len(run.tokens) < 9:
            run.take(source.step(), "moving")
        moves = [(source, middle, "m-out"), (middle, last, "m-back")]
        for (src, dst, mid), steps in zip(moves, (0, 11)):
            for _ in range(steps):
                run.take(src.step(), "moving")
            seq = src.requests["moving"].seq
            full = seq.num_computed_tokens // src.blocks.block_size
            kv_before = src.read_kv(seq.block_ids[:full])  # full blocks: no step writes them again
            migrate(src, dst, "moving", run, mid=mid, check_blocks=False)
            assert src.blocks.num_free_blocks == src.blocks.num_blocks - sum(
                len(r.seq.block_ids) for r in src.requests.values())
            moved = dst.read_kv(dst.requests["moving"].seq.block_ids)
            assert torch.equal(moved[:, :, :full], kv_before)  # written where the blocks now are
        while "moving" in last.requests:
            run.take(last.step(), "moving")
        assert run.tokens == want.tokens and run.finish == want.finish
    finally:
        for engine in engines:
            engine.shutdown()


def test_worker_actors_migrate_requests_to_and_from_an_offloading_worker(ray_local, make_model):
    """The same through worker actors and the object-store transport, as the router
    sees it: a request moves off the offloading worker, another onto it."""
    model = str(make_model(MODEL))
    offload = {"workers": 2, "cpus_per_worker": 0.5}
    handles = {"offloading": worker_streams.start(ray_local, "offloading", model, attention_offload=offload),
               "plain": worker_streams.start(ray_local, "plain", model)}
    try:
        for n, (source, dest) in enumerate([("offloading", "plain"), ("plain", "offloading")]):
            p, rid = worker_streams.prompt(30 + n, 40), f"{source}-to-{dest}"
            busy = handles[dest].generate.remote(WorkerRequest(f"busy-{n}", worker_streams.prompt(40 + n, 50),
                                                               worker_streams.LONG))  # other blocks at dest
            follower = worker_streams.Follower(handles, source)
            events, (result,) = worker_streams.run(follower.run(
                WorkerRequest(rid, p, worker_streams.LONG), 20,
                [worker_streams.order(handles, rid, f"m-{rid}", dest)], source))
            assert result.committed and result.blocks >= 3, result
            assert worker_streams.tokens(events) == worker_streams.undisturbed(model, p, worker_streams.LONG)
            assert [a.worker_id for a in follower.attempts] == [source, dest]
            for ref in busy:
                ray_local.get(ref)
        worker_streams.assert_all_free(ray_local, *handles.values())
    finally:
        for h in handles.values():
            ray_local.get(h.shutdown.remote())
            ray_local.kill(h)


def test_a_worker_group_without_the_attention_bundles_is_refused(ray_local, make_model):
    """A worker actor in a group made for other settings (here: no bundle for the
    attention workers) says so, instead of placing them in a second group."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"CPU": 0.5}])
    ray_local.get(group.ready())
    try:
        build = ray_local.remote(num_cpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(group, 0))(
            lambda model: LLMEngine(EngineConfig(model=model, attention_offload={"workers": 2})))
        with pytest.raises(ray_local.exceptions.RayTaskError,
                           match="placement group of 1 bundles, and its engine needs 3"):
            ray_local.get(build.remote(str(make_model(MODEL))))
    finally:
        remove_placement_group(group)


@pytest.mark.parametrize("offloading", ["prefill", "decode"])
def test_prefill_hands_off_to_decode_with_an_offloading_worker_on_either_side(ray_local, make_model, offloading):
    """P/D: the prompt's KV streams layer by layer from the prefill worker to the
    decode worker while the prefill computes; on an offloading side it is read from,
    or written to, the attention workers. The client sees the undisturbed output."""
    model = str(make_model(MODEL))
    offload = {"attention_offload": {"workers": 2, "cpus_per_worker": 0.5}}
    prefill = worker_streams.start(ray_local, f"pre-{offloading}", model, "prefill", max_num_batched_tokens=32,
                                   **(offload if offloading == "prefill" else {}))
    decode = worker_streams.start(ray_local, f"dec-{offloading}", model, "decode",
                                  **(offload if offloading == "decode" else {}))
    handles = {f"pre-{offloading}": prefill, f"dec-{offloading}": decode}
    try:
        busy = decode.generate.remote(WorkerRequest("busy", worker_streams.prompt(41, 50), PARAMS))
        p, params = worker_streams.prompt(42, 300), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        follower = worker_streams.Follower(handles, f"pre-{offloading}")
        events, _ = worker_streams.run(follower.run(
            WorkerRequest("pd", p, params, handoff_to=f"dec-{offloading}"), 1 << 30, [], f"pre-{offloading}"))
        assert worker_streams.tokens(events) == worker_streams.undisturbed(model, p, params)
        assert [(a.worker_id, a.moved_in) for a in follower.attempts] == [
            (f"pre-{offloading}", False), (f"dec-{offloading}", True)]
        result = ray_local.get(prefill.recent_handoffs.remote())[-1]
        assert result.committed and result.stages >= 3, result  # streamed while the prefill computed
        for ref in busy:
            ray_local.get(ref)
        worker_streams.assert_all_free(ray_local, prefill, decode)
    finally:
        for h in handles.values():
            ray_local.get(h.shutdown.remote())
            ray_local.kill(h)
