"""The simulator's engine decides as the real one: the same requests into LLMEngine
(tiny model) and SimEngine give, step after step, the same batches, block tables,
preemptions, prefix-cache hits and free-block order; and the report the workers send
reads the same from both."""

from __future__ import annotations

import random

from cluster.sim.engine import SimEngine
from cluster.sim.step_time import StepTimeModel
from workers import SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.load_report import load_report


def prompt(seed: int, n: int, shared: list[int] = ()) -> list[int]:
    rng = random.Random(seed)
    return list(shared) + [rng.randrange(4, 1000) for _ in range(n - len(shared))]


def state(engine) -> tuple:
    s = engine.scheduler
    return ([(q.request_id, tuple(q.block_ids), q.num_computed_tokens, q.num_cached_tokens) for q in s.running],
            [(q.request_id, q.num_preemptions) for q in s.waiting], s.num_preemptions,
            list(engine.blocks.free_queue), sorted(engine.requests))


def test_the_simulated_engine_schedules_blocks_and_preempts_exactly_as_the_real_one(make_model):
    config = EngineConfig(model=str(make_model("tiny-llama")), num_kv_blocks=14, max_num_batched_tokens=48)
    real = LLMEngine(config)
    timing = StepTimeModel(0.01, 0.0, 0.0, 0.0, 0.0, block_size=16, kv_block_bytes=1, max_position_embeddings=4096)
    sim = SimEngine(config, timing, lambda: 0.0)
    system = prompt(0, 40)  # two requests share a 2-block prefix: the prefix cache hits
    requests = [("a", prompt(1, 45), 30), ("b", prompt(2, 60, system), 25), ("c", prompt(3, 50, system), 20),
                ("d", prompt(4, 33), 30)]
    arrivals = {0: requests[:2], 3: requests[2:3], 5: requests[3:]}
    steps = preempted = 0
    while steps == 0 or real.has_unfinished_requests():
        for rid, tokens, max_tokens in arrivals.get(steps, []):
            real.add_request(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                             arrival_time=float(steps))
            sim.add(rid, tokens, max_tokens, arrival_time=float(steps))
        real_out = real.step()
        planned = sim.plan()
        sim_out = sim.finish(planned) if planned is not None else []
        assert [(o.request_id, o.start_index, o.finished) for o in real_out if o.new_token_ids] == \
               [(p.request_id, p.index, p.finished) for p in sim_out], f"step {steps}"
        assert state(real) == state(sim), f"step {steps}"
        preempted = real.scheduler.num_preemptions
        steps += 1
    assert not sim.requests and sim.blocks.num_free_blocks == 14
    assert preempted >= 1, "the test must exercise preemption"
    assert real.blocks.prefix_hit_tokens == sim.blocks.prefix_hit_tokens > 0


def test_a_simulated_worker_reports_its_load_as_a_real_one(make_model):
    config = EngineConfig(model=str(make_model("tiny-llama")), num_kv_blocks=20, max_num_batched_tokens=64)
    real = LLMEngine(config)
    timing = StepTimeModel(0.01, 0.0, 0.0, 0.0, 0.0, block_size=16, kv_block_bytes=1, max_position_embeddings=4096)
    sim = SimEngine(config, timing, lambda: 0.0)
    for i, n in enumerate((30, 70, 100)):
        real.add_request(f"q{i}", prompt(i, n), SamplingParams(max_tokens=8, ignore_eos=True), arrival_time=float(i))
        sim.add(f"q{i}", prompt(i, n), 8, arrival_time=float(i))
    real.step()
    sim.finish(sim.plan())
    fields = ("num_running", "num_waiting", "free_blocks", "total_blocks", "freeness", "head_of_line_blocks",
              "requests", "queued_prefill_tokens", "max_model_len", "cached_block_hashes")
    a, b = load_report(real, "w", "mixed", 64, now=1.0), load_report(sim, "w", "mixed", 64, now=1.0)
    assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}
    assert (a.num_running, a.num_waiting, a.queued_prefill_tokens) == (2, 1, 36 + 100)  # the budget: 30 + 34
