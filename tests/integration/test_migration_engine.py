"""Live migration between two engines in one process: exact KV, exact output, every
race of the protocol's engine side, and no block leaked on either side.

The destination always holds other requests' blocks first, so its block ids differ
from the source's and a mix-up of the two cannot pass."""

from __future__ import annotations

import random
from typing import Callable, Optional

import pytest
import torch

from workers import SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.handoff import HandoffError
from workers.kv_transport import InProcessTransport

TRANSPORT = InProcessTransport()


@pytest.fixture(scope="module")
def llama_dir(make_model):
    return str(make_model("tiny-llama"))


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 1000) for _ in range(n)]


class Run:
    """Collects one request's outputs: tokens by absolute index, text, logprobs."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.logprobs: list = []
        self.finish: Optional[tuple] = None

    def take(self, outputs, request_id: str) -> None:
        for out in outputs:
            if out.request_id != request_id:
                continue
            assert out.start_index == len(self.tokens), "gap or duplicate"
            self.tokens.extend(out.new_token_ids)
            self.text += out.new_text
            self.logprobs.extend(out.new_logprobs or ())
            if out.finished:
                self.finish = (out.finish_reason, out.stop_reason)


def undisturbed(config: EngineConfig, tokens: list[int], params: SamplingParams) -> Run:
    engine = LLMEngine(config)
    engine.add_request("ref", tokens, params)
    run = Run()
    while engine.has_unfinished_requests():
        run.take(engine.step(), "ref")
    return run


def busy_destination(config: EngineConfig, num_requests: int = 3) -> LLMEngine:
    """An engine that holds other requests' blocks (and keeps them: they run long)."""
    dest = LLMEngine(config)
    for i in range(num_requests):
        dest.add_request(f"other-{i}", prompt(100 + i, 37), SamplingParams(temperature=0, max_tokens=500,
                                                                            ignore_eos=True))
    dest.step()
    return dest


def migrate(source: LLMEngine, dest: LLMEngine, request_id: str, run: Run, mid: str = "m1",
            between: Callable[[], None] = lambda: None, pause_at: int = 1,
            check_blocks: bool = True) -> int:
    """The protocol's engine side, as the worker drives it, with the source stepping
    between stages. Returns the number of stages."""
    num_tokens = source.start_migration(mid, request_id)
    dest.reserve_migration(mid, request_id, num_tokens)
    stages = 0
    while True:
        step = source.advance_migration(mid, pause_at)
        stage = step.stage
        if stage.block_ids:
            needed = (stage.first_block + len(stage.block_ids)) * source.blocks.block_size
            dest.grow_reservation(mid, needed)
            TRANSPORT.receive(dest, mid, stage.first_block, TRANSPORT.send(source, stage.block_ids))
            if check_blocks:
                assert_same_kv(source, stage.block_ids, dest, mid, stage.first_block)
        stages += 1
        if step.paused:
            break
        run.take(source.step(), request_id)  # decoding goes on during pre-copy
        between()
    dest.commit_migration(mid, step.state)
    assert source.complete_migration(mid) == len(run.tokens)
    return stages


def assert_no_leak(engine: LLMEngine) -> None:
    """Every block not held by a request here is free (the others keep running)."""
    held = sum(len(r.seq.block_ids) for r in engine.requests.values())
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks - held


def assert_same_kv(source: LLMEngine, source_ids, dest: LLMEngine, mid: str, first_block: int) -> None:
    dest_ids = dest.destination._by_id[mid].block_ids[first_block:first_block + len(source_ids)]
    assert list(dest_ids) != list(source_ids)  # different blocks on the two sides
    for layer in range(source.runner.kv_caches.shape[0]):
        got = dest.runner.kv_caches[layer, :, list(dest_ids)]
        want = source.runner.kv_caches[layer, :, list(source_ids)]
        assert torch.equal(got, want), f"layer {layer} differs"


PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=48, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.8, seed=3, presence_penalty=0.5, frequency_penalty=0.4,
                                repetition_penalty=1.3, max_tokens=48, ignore_eos=True),
    "logprobs": SamplingParams(temperature=0, logprobs=3, max_tokens=48, ignore_eos=True),
}


@pytest.fixture(scope="module")
def pair(llama_dir):
    """A source and a busy destination, shared by the tests that leave both as they
    found them; the reference engine runs each request undisturbed."""
    config = EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, block_size=8)
    return config, LLMEngine(config), busy_destination(config)


@pytest.mark.parametrize("kind", sorted(PARAMS))
@pytest.mark.parametrize("cut", [1, 9, 30])
def test_migrated_request_continues_exactly(pair, kind, cut):
    config, source, dest = pair
    params = PARAMS[kind]
    tokens = prompt(cut, 45)
    want = undisturbed(config, tokens, params)
    free_source = source.blocks.num_free_blocks
    rid = f"{kind}-{cut}"
    source.add_request(rid, tokens, params, arrival_time=12.5, priority=2)
    run = Run()
    while len(run.tokens) < cut:
        run.take(source.step(), rid)
    migrate(source, dest, rid, run, mid=f"m-{rid}")
    assert source.blocks.num_free_blocks == free_source
    assert rid not in source.requests
    seq = dest.requests[rid].seq
    assert (seq.arrival_time, seq.priority) == (12.5, 2)
    while rid in dest.requests:
        run.take(dest.step(), rid)
    assert_no_leak(dest)
    assert run.tokens == want.tokens
    assert run.text == want.text
    assert run.finish == want.finish
    if params.logprobs is not None:
        assert [(t.token_id, t.top_logprobs is not None) for t in run.logprobs] == \
               [(t.token_id, True) for t in want.logprobs]
        # The destination computes the request beside its other requests, the reference
        # alone: float32 matmuls (MKL) sum in an order that depends on the batch's row
        # count, so logprobs agree to float noise (~1e-5 seen), not to the bit.
        for got, exp in zip(run.logprobs, want.logprobs):
            assert abs(got.logprob - exp.logprob) < 1e-4


def test_stop_string_and_held_back_text_survive_the_move(pair):
    config, source, dest = pair
    base = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tokens = prompt(3, 20)
    full = undisturbed(config, tokens, base).text
    # A stop string that starts before the cut and ends after it: the source holds
    # its start back, and the destination must complete the match.
    stop = full[20:26]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    want = undisturbed(config, tokens, params)
    assert want.finish == ("stop", stop)
    for cut in range(1, len(want.tokens)):
        rid = f"stop-{cut}"
        source.add_request(rid, tokens, params)
        run = Run()
        while len(run.tokens) < cut:
            run.take(source.step(), rid)
        migrate(source, dest, rid, run, mid=f"m-{rid}", pause_at=1 << 20, check_blocks=False)
        while rid in dest.requests:
            run.take(dest.step(), rid)
        assert (run.tokens, run.text, run.finish) == (want.tokens, want.text, want.finish), cut


def test_long_request_moves_in_several_stages_while_decoding(llama_dir):
    config = EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, block_size=4, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    tokens = prompt(5, 150)
    want = undisturbed(config, tokens, params)
    source, dest = LLMEngine(config), busy_destination(config)
    source.add_request("r", tokens, params)
    run = Run()
    while len(run.tokens) < 3:
        run.take(source.step(), "r")
    # Pause only when nothing is left: every decode step completes a block now and then.
    stages = migrate(source, dest, "r", run, pause_at=1)
    assert stages >= 2
    while "r" in dest.requests:
        run.take(dest.step(), "r")
    assert run.tokens == want.tokens


def test_waiting_request_moves_without_kv(llama_dir):
    config = EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = undisturbed(config, prompt(8, 30), params)
    source, dest = LLMEngine(config), LLMEngine(config)
    source.add_request("first", prompt(9, 30), params)
    source.add_request("r", prompt(8, 30), params)
    source.step()  # "r" waits: one sequence at a time
    run = Run()
    assert migrate(source, dest, "r", run) == 1
    assert dest.requests["r"].seq.block_ids == []
    while "r" in dest.requests:
        run.take(dest.step(), "r")
    assert run.tokens == want.tokens


@pytest.mark.parametrize("race", ["finished", "aborted", "preempted"])
def test_request_leaving_during_precopy_ends_the_migration_cleanly(llama_dir, race):
    config = EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, block_size=4, num_kv_blocks=40)
    params = SamplingParams(temperature=0, max_tokens=12 if race == "finished" else 40, ignore_eos=True)
    source, dest = LLMEngine(config), busy_destination(config, 1)
    source.add_request("r", prompt(1, 60), params)
    run = Run()
    while len(run.tokens) < 5:
        run.take(source.step(), "r")
    dest_free = dest.blocks.num_free_blocks
    dest.reserve_migration("m", "r", source.start_migration("m", "r"))
    stage = source.advance_migration("m", 1).stage
    pinned = list(stage.block_ids)
    if race == "finished":
        while "r" in source.requests:
            run.take(source.step(), "r")
    elif race == "aborted":
        source.abort("r")
        source.step()
    else:
        source.add_request("vip", prompt(2, 100), params, priority=5)  # needs r's blocks
        source.step()
        assert source.requests["r"].seq.num_preemptions == 1
    # The copied blocks stay pinned: no other request took them meanwhile.
    assert all(source.blocks.ref_counts[b] >= 1 for b in pinned)
    with pytest.raises(HandoffError) as err:
        source.advance_migration("m", 1)
    assert err.value.reason == race
    source.resume_after_migration("m")
    dest.cancel_migration("m")
    assert dest.blocks.num_free_blocks == dest_free
    for rid in list(source.requests):
        source.abort(rid)
    source.step()
    assert source.blocks.num_free_blocks == source.blocks.num_blocks


def test_abort_while_paused_keeps_no_block_and_complete_refuses(llama_dir):
    config = EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, block_size=8)
    source = LLMEngine(config)
    source.add_request("r", prompt(4, 30), PARAMS["greedy"])
    source.step()
    source.start_migration("m", "r")
    step = source.advance_migration("m", 1 << 20)
    assert step.paused
    assert source.scheduler.running == []
    source.abort("r")
    with pytest.raises(HandoffError, match="aborted"):
        source.complete_migration("m")
    source.resume_after_migration("m")
    source.step()
    assert source.blocks.num_free_blocks == source.blocks.num_blocks


def test_abort_before_commit_resumes_decoding_exactly(llama_dir):
    config = EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, block_size=8)
    want = undisturbed(config, prompt(6, 33), PARAMS["seeded"])
    source = LLMEngine(config)
    source.add_request("r", prompt(6, 33), PARAMS["seeded"])
    run = Run()
    while len(run.tokens) < 10:
        run.take(source.step(), "r")
    source.start_migration("m", "r")
    source.advance_migration("m", 1 << 20)  # paused
    assert source.step() == []  # nothing runs while paused
    source.resume_after_migration("m")
    while "r" in source.requests:
        run.take(source.step(), "r")
    assert run.tokens == want.tokens
    assert source.blocks.num_free_blocks == source.blocks.num_blocks


def test_two_migrations_of_one_request_are_refused(llama_dir):
    source = LLMEngine(EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25))
    source.add_request("r", prompt(1, 20), PARAMS["greedy"])
    source.step()
    source.start_migration("m1", "r")
    with pytest.raises(HandoffError, match="already migrating"):
        source.start_migration("m2", "r")
    source.resume_after_migration("m1")


def test_reservations_respect_watermark_and_max_num_seqs(llama_dir):
    dest = LLMEngine(EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, block_size=8, num_kv_blocks=200, max_num_seqs=2))
    assert dest.blocks.watermark_blocks == 2
    with pytest.raises(HandoffError, match="above the watermark") as err:
        dest.reserve_migration("big", "r0", 199 * 8)
    assert err.value.reason == "no_room"
    dest.reserve_migration("a", "r1", 8 * 100)
    with pytest.raises(HandoffError, match="above the watermark"):
        dest.grow_reservation("a", 8 * 199)
    dest.reserve_migration("b", "r2", 8)
    with pytest.raises(HandoffError, match="max_num_seqs=2"):
        dest.reserve_migration("c", "r3", 8)
    # Reserved sequences count in the scheduler: a third request waits.
    dest.add_request("x", prompt(1, 5), PARAMS["greedy"])
    dest.step()
    assert [s.request_id for s in dest.scheduler.waiting] == ["x"]
    dest.cancel_migration("a")
    dest.cancel_migration("b")
    dest.step()
    assert [s.request_id for s in dest.scheduler.running] == ["x"]


def test_reservation_expires_on_an_idle_engine_and_late_writes_fail(llama_dir):
    now = [0.0]
    config = EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25, kv_reservation_timeout_s=5.0)
    dest = LLMEngine(config, clock=lambda: now[0])
    total = dest.blocks.num_free_blocks
    assert len(dest.reserve_migration("m", "r", 100)) == 7
    now[0] = 4.0
    dest.grow_reservation("m", 120)  # activity extends the deadline
    now[0] = 8.9
    assert dest.expire_reservations() == []
    now[0] = 9.0
    assert dest.expire_reservations() == ["m"]
    assert dest.blocks.num_free_blocks == total
    with pytest.raises(HandoffError, match="no KV reservation"):
        dest.begin_kv_write("m", 0, 1)


def test_cancel_during_a_write_releases_blocks_only_after_it(llama_dir):
    dest = LLMEngine(EngineConfig(model=str(llama_dir), kv_cache_memory_gib=0.25))
    total = dest.blocks.num_free_blocks
    dest.reserve_migration("m", "r", 64)
    ids = dest.begin_kv_write("m", 0, 2)
    dest.cancel_migration("m")
    assert dest.blocks.num_free_blocks == total - 4  # the write is still landing
    with pytest.raises(HandoffError, match="no KV reservation"):
        dest.begin_kv_write("m", 2, 1)
    dest.write_kv(ids, dest.read_kv(ids))
    dest.end_kv_write("m")
    dest.expire_reservations()
    assert dest.blocks.num_free_blocks == total
