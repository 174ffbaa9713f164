"""Prefill→decode handoff between worker actors, followed by the router's request state
machine: the prompt's KV streams to the decode worker while the prefill computes, the
client sees one exact stream, and the KV that arrives equals the KV that left, block by
block and layer by layer. Then every failure the handoff can meet: the decode worker
dead before, during and after the transfer, a transfer that times out, a full decode
worker, and a prefill worker that dies mid-transfer. Each ends with the undisturbed
output and no KV block held anywhere."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest
import torch
from ray import cloudpickle
from conditions import wait_until
from worker_streams import Follower, assert_all_free, prompt, run, start, tokens, undisturbed

from workers import SamplingParams
from workers.engine.block_manager import chain_hash
from workers.events import WorkerRequest
from workers.worker import Worker

GREEDY = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, seed=5, max_tokens=60, ignore_eos=True)
CHUNK = 32  # the prefill workers compute prompts in chunks of this many tokens

# Worker processes cannot import this test module: what runs there travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def model_dir(make_model):
    return str(make_model("tiny-llama"))


@pytest.fixture(scope="module")
def pd(ray_local, model_dir):
    handles = {"p1": start(ray_local, "p1", model_dir, "prefill", max_num_batched_tokens=CHUNK),
               "d1": start(ray_local, "d1", model_dir, "decode")}
    yield handles
    stop(ray_local, *handles.values())


def stop(ray, *handles: Any) -> None:
    for h in handles:
        try:
            ray.get(h.shutdown.remote())
        except Exception:  # noqa: BLE001 - killed by the test
            pass
        ray.kill(h)


def in_actor(ray, handle: Any, fn: Any) -> Any:
    return ray.get(handle.__ray_call__.remote(fn))


def engine_stats(worker: Worker) -> Any:
    return worker.engine.stats()


def incoming(ray, handle: Any) -> int:
    """Migrations into the worker not yet committed, as its load report says."""
    return ray.get(handle.load.remote()).migrations_in


def last_handoff(ray, prefill: Any) -> Any:
    return ray.get(prefill.recent_handoffs.remote())[-1]


def serve(handles: dict[str, Any], first: str, request: WorkerRequest, fallback: str | None = None,
          after_tokens: int = 1 << 30, then: Any = None) -> tuple[list[Any], Follower]:
    f = Follower(handles, first, fallback)
    events, _ = run(f.run(request, after_tokens, [], first, then=then))
    return events, f


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_the_prompt_kv_streams_while_it_computes_and_the_output_is_exact(ray_local, pd, model_dir, params):
    p = prompt(int(10 * params.temperature), 400)  # 13 chunks of prefill, no prefix hit
    before = in_actor(ray_local, pd["d1"], engine_stats)
    rid = f"pd-{params.temperature}"
    events, f = serve(pd, "p1", WorkerRequest(rid, p, params, handoff_to="d1"))
    assert tokens(events) == undisturbed(model_dir, p, params)
    assert [(a.worker_id, a.moved_in) for a in f.attempts] == [("p1", False), ("d1", True)]
    result = last_handoff(ray_local, pd["p1"])
    assert (result.request_id, result.outcome, result.reason) == (rid, "committed", "handoff"), result
    # Stages streamed the prompt's 25 blocks while it computed, one per forward, each
    # layer by layer; the pause copies nothing more (no block twice) unless the request
    # decoded one more token here meanwhile, into a 26th block.
    computed = len(p) + result.next_index - 1
    assert result.blocks == -(-computed // 16) and result.stages >= 3, result
    assert result.payloads >= result.stages - 1, result
    # Most sends ended before the pause; the last layers' may end after it.
    assert 0 < result.prefill_copy_s <= result.copy_s, result
    after = in_actor(ray_local, pd["d1"], engine_stats)
    # The decode worker ran only decode steps: one token per output token it produced.
    assert after.computed_tokens - before.computed_tokens == params.max_tokens - result.next_index
    assert after.num_migrated_in == before.num_migrated_in + 1
    assert_all_free(ray_local, pd["p1"], pd["d1"])


def handed_off_by(ray, pd, model_dir: str, prefill_id: str, settings: dict[str, Any], p: tuple[int, ...]) -> Any:
    """One request through a prefill worker of its own with these settings, to d1:
    exact output, moved once; returns the handoff's result (the workers left clean)."""
    prefill = start(ray, prefill_id, model_dir, "prefill", worker=settings, max_num_batched_tokens=CHUNK)
    try:
        events, f = serve({prefill_id: prefill, "d1": pd["d1"]}, prefill_id,
                          WorkerRequest(f"via-{prefill_id}", p, GREEDY, handoff_to="d1"))
        assert tokens(events) == undisturbed(model_dir, p, GREEDY)
        assert [a.worker_id for a in f.attempts] == [prefill_id, "d1"]
        result = last_handoff(ray, prefill)
        assert result.committed, result
        assert_all_free(ray, prefill, pd["d1"])
        return result
    finally:
        stop(ray, prefill)


def test_without_streaming_the_kv_is_copied_after_the_prefill(ray_local, pd, model_dir):
    p = prompt(22, 400)
    result = handed_off_by(ray_local, pd, model_dir, "p-after", {"handoff_streaming": False}, p)
    # Nothing copied during the prefill; after the first token, the 25 full blocks
    # while the request decodes on, then the pause for the rest.
    assert (result.stages, result.prefill_copy_s) == (2, 0.0), result
    assert result.blocks == -(-(len(p) + result.next_index - 1) // 16), result


def test_streamed_by_chunk_each_forward_goes_in_one_send(ray_local, pd, model_dir):
    p = prompt(23, 300)
    result = handed_off_by(ray_local, pd, model_dir, "p-chunk", {"handoff_stream_unit": "chunk"}, p)
    # One send per stage, all layers at once. The last forward's stage holds the
    # part-full 19th block; the pause sends nothing, unless the request decoded
    # before it: that block again.
    assert result.stages >= 3, result
    assert result.payloads == result.stages - (result.next_index == 1), result
    assert result.blocks == -(-len(p) // 16) + (result.next_index > 1), result


def cached_prompt_kv(p: tuple[int, ...]) -> Any:
    """Run in a worker: the block ids its prefix cache holds for p's full blocks, and
    their KV, [layers, 2, blocks, block_size, kv heads, head dim]."""

    def read(worker: Worker) -> tuple[list[int], torch.Tensor]:
        blocks = worker.engine.blocks
        hashes, parent = [], None
        for i in range(len(p) // blocks.block_size):
            parent = chain_hash(parent, tuple(p[i * blocks.block_size:(i + 1) * blocks.block_size]))
            hashes.append(parent)
        ids = [blocks.cached[h] for h in hashes]
        return ids, worker.engine.read_kv(ids).clone()

    return read


def test_the_kv_received_equals_the_kv_sent_block_by_block_and_layer_by_layer(ray_local, pd):
    p = prompt(12, 6 * 16)  # six full blocks: the first token's KV starts a seventh
    # Something else runs on d1 meanwhile, so the request lands in other block ids there.
    busy = pd["d1"].generate.remote(WorkerRequest("d1-own", prompt(13, 70), GREEDY))
    events, f = serve(pd, "p1", WorkerRequest("kv-check", p, GREEDY, handoff_to="d1"))
    for ref in busy:
        ray_local.get(ref)
    assert [a.worker_id for a in f.attempts] == ["p1", "d1"]
    # Both prefix caches keep the prompt's full blocks under the same hashes.
    sent_ids, sent = in_actor(ray_local, pd["p1"], cached_prompt_kv(p))
    got_ids, got = in_actor(ray_local, pd["d1"], cached_prompt_kv(p))
    assert sent_ids != got_ids
    assert sent.shape == got.shape and sent.shape[2] == 6
    for layer in range(sent.shape[0]):
        for block in range(sent.shape[2]):
            assert torch.equal(sent[layer, :, block], got[layer, :, block]), f"layer {layer}, block {block} differ"
    assert_all_free(ray_local, pd["p1"], pd["d1"])


def test_a_decode_worker_dead_before_the_handoff_costs_only_the_split(ray_local, pd, model_dir):
    gone = start(ray_local, "d-gone", model_dir, "decode")
    events, _ = serve({**pd, "d-gone": gone}, "p1", WorkerRequest("while-alive", prompt(20, 50), GREEDY,
                                                                  handoff_to="d-gone"))
    assert last_handoff(ray_local, pd["p1"]).committed  # p1 keeps its handle
    ray_local.kill(gone)
    for rid, target, error in (("to-nobody", "d-never", "no_worker"), ("to-dead", "d-gone", "ActorDiedError"),
                               ("to-dead-again", "d-gone", "no_worker")):
        p = prompt(len(rid), 100)
        events, f = serve(pd, "p1", WorkerRequest(rid, p, SEEDED, handoff_to=target))
        assert tokens(events) == undisturbed(model_dir, p, SEEDED)
        assert [a.worker_id for a in f.attempts] == ["p1"]
        result = last_handoff(ray_local, pd["p1"])
        assert (result.request_id, result.outcome) == (rid, "failed") and result.error.startswith(error), result
    assert_all_free(ray_local, pd["p1"])


def test_a_decode_worker_killed_during_the_transfer(ray_local, pd, model_dir):
    """Killed once its reservation is made and blocks stream in, before the first token:
    the request goes on at the prefill worker, which still holds its KV."""
    doomed = start(ray_local, "d-doomed", model_dir, "decode")
    handles = {**pd, "d-doomed": doomed}
    p = prompt(14, 1900)  # 60 chunks: the transfer runs for many steps
    killed = threading.Event()

    def kill_when_receiving() -> None:
        wait_until(lambda: incoming(ray_local, doomed), 60, "the decode worker to reserve room")
        ray_local.kill(doomed)
        killed.set()

    killer = threading.Thread(target=kill_when_receiving)
    killer.start()
    events, f = serve(handles, "p1", WorkerRequest("mid-transfer", p, GREEDY, handoff_to="d-doomed"))
    killer.join()
    assert killed.is_set()
    assert tokens(events) == undisturbed(model_dir, p, GREEDY)
    assert [a.worker_id for a in f.attempts] == ["p1"]
    result = last_handoff(ray_local, pd["p1"])
    assert result.outcome == "failed" and result.stages >= 1, result  # a stage was on its way
    assert_all_free(ray_local, pd["p1"])


def test_a_decode_worker_killed_after_the_transfer(ray_local, pd, model_dir):
    """Killed while it decodes the request: the router resumes it from the tokens sent."""
    doomed = start(ray_local, "d-late", model_dir, "decode")
    handles = {**pd, "d-late": doomed}
    p = prompt(15, 120)

    async def kill() -> None:
        ray_local.kill(doomed)

    events, f = serve(handles, "p1", WorkerRequest("after-transfer", p, SEEDED, handoff_to="d-late"),
                      after_tokens=10, then=kill)
    assert tokens(events) == undisturbed(model_dir, p, SEEDED)
    # Resumed on the only worker left: the prefill worker recomputes it and decodes it.
    assert [(a.worker_id, a.moved_in) for a in f.attempts] == [("p1", False), ("d-late", True), ("p1", False)]
    assert f.failures == ["d-late"]
    assert_all_free(ray_local, pd["p1"])


class StepGate:
    """Stands in for a worker's `_step`: the stepping thread waits here for a permit
    before each engine step, so the test decides at which step a request arrives."""

    def __init__(self, step: Any) -> None:
        self.step, self.permits, self.open, self.waiting = step, threading.Semaphore(0), False, False

    def __call__(self) -> Any:
        if not self.open:
            self.waiting = True
            self.permits.acquire()
            self.waiting = False
        return self.step()


def hold_steps(worker: Worker) -> None:
    worker._step = StepGate(worker._step)


def allow_steps(n: int) -> Any:
    return lambda worker: worker._step.permits.release(n)


def held_after(n: int) -> Any:
    return lambda worker: worker._step.waiting and worker.engine.num_steps == n


def queued(request_id: str) -> Any:
    return lambda worker: request_id in worker._channel_of  # set as its AddRequest is queued


def release_steps(worker: Worker) -> None:
    worker._step.open = True
    worker._step.permits.release()


def test_a_prefill_preempted_mid_prompt_is_handed_off_once_recomputed(ray_local, pd, model_dir):
    """The prefill worker runs out of KV while the prompt computes: the request is
    preempted (its stream of KV to the decode worker ends there, and that reservation
    goes), recomputed once room comes, and handed off then.

    How often it is preempted depends on how far the occupant has decoded when the
    prompt arrives, so the worker's steps are held until the prompt is queued: it
    arrives at step 19 always, and is preempted twice before its prompt is done."""
    pid = "p-preempt"
    # 40 blocks: the occupant's 15 and then some, and the prompt's 25 do not fit together.
    prefill = start(ray_local, pid, model_dir, "prefill", max_num_batched_tokens=CHUNK, num_kv_blocks=40)
    decode = pd["d1"]
    try:
        in_actor(ray_local, prefill, hold_steps)
        occupant_p, occupant_params = prompt(26, 15 * 16), SamplingParams(temperature=0, max_tokens=100,
                                                                          ignore_eos=True)
        occupant = prefill.generate.remote(WorkerRequest("occupant", occupant_p, occupant_params))
        # Its prompt in 8 chunks, then 10 tokens: it decodes (a block more every 16 tokens) from here.
        in_actor(ray_local, prefill, allow_steps(8 + 10))
        wait_until(lambda: in_actor(ray_local, prefill, held_after(18)), 60, "the occupant's 18 steps")
        p = prompt(27, 25 * 16)

        def release_once_queued() -> None:
            wait_until(lambda: in_actor(ray_local, prefill, queued("preempted")), 60, "the prompt queued")
            in_actor(ray_local, prefill, release_steps)

        releaser = threading.Thread(target=release_once_queued, daemon=True)
        releaser.start()
        before = in_actor(ray_local, decode, engine_stats)
        events, f = serve({pid: prefill, "d1": decode}, pid, WorkerRequest("preempted", p, GREEDY, handoff_to="d1"))
        releaser.join()
        assert tokens(events) == undisturbed(model_dir, p, GREEDY)
        assert [a.worker_id for a in f.attempts] == [pid, "d1"]
        assert in_actor(ray_local, prefill, engine_stats).num_preemptions == 2
        result = last_handoff(ray_local, prefill)
        assert result.committed and result.request_id == "preempted", result
        after = in_actor(ray_local, decode, engine_stats)
        assert after.computed_tokens - before.computed_tokens == GREEDY.max_tokens - result.next_index
        occupant_events = [e for ref in occupant for e in ray_local.get(ref)]
        assert tokens(occupant_events) == undisturbed(model_dir, occupant_p, occupant_params)
        assert_all_free(ray_local, prefill, decode)
    finally:
        stop(ray_local, prefill)


class StuckDecodeWorker(Worker):
    """A decode worker that takes KV far slower than the source waits for."""

    async def receive_kv(self, migration_id: str, first_block: int, payload: Any) -> None:
        await asyncio.sleep(2.0)
        await super().receive_kv(migration_id, first_block, payload)


def test_a_transfer_that_times_out_frees_the_blocks_on_both_sides(ray_local, model_dir):
    prefill = start(ray_local, "p-impatient", model_dir, "prefill", worker={"migration_call_timeout_s": 0.5},
                    max_num_batched_tokens=CHUNK)
    stuck = start(ray_local, "d-stuck", model_dir, "decode", actor_class=StuckDecodeWorker)
    try:
        handles = {"p-impatient": prefill, "d-stuck": stuck}
        p = prompt(16, 200)
        events, f = serve(handles, "p-impatient", WorkerRequest("slow", p, GREEDY, handoff_to="d-stuck"))
        assert tokens(events) == undisturbed(model_dir, p, GREEDY)
        assert [a.worker_id for a in f.attempts] == ["p-impatient"]
        result = last_handoff(ray_local, prefill)
        assert result.outcome == "failed" and result.error.startswith("timeout: receive_kv on d-stuck"), result
        assert_all_free(ray_local, prefill)
        wait_until(lambda: not incoming(ray_local, stuck), 30, "the stuck worker's reservation to go")
        assert_all_free(ray_local, stuck)
    finally:
        stop(ray_local, prefill, stuck)


@pytest.mark.parametrize("room_comes", [False, True], ids=["never", "later"])
def test_a_full_decode_worker(ray_local, model_dir, room_comes):
    """The decode worker has no room: the handoff is asked again while the request
    decodes on the prefill worker; it moves once room comes, or stays there."""
    wait_s = 60.0 if room_comes else 0.3
    pid, did = f"p-full-{room_comes}", f"d-full-{room_comes}"
    prefill = start(ray_local, pid, model_dir, "prefill", worker={"handoff_wait_s": wait_s},
                    max_num_batched_tokens=CHUNK)
    full = start(ray_local, did, model_dir, "decode", max_num_seqs=1)
    try:
        handles = {pid: prefill, did: full}
        occupant = full.generate.remote(WorkerRequest("occupant", prompt(17, 40),
                                                      SamplingParams(temperature=0, max_tokens=40 if room_comes
                                                                     else 1500, ignore_eos=True)))
        wait_until(lambda: ray_local.get(full.load.remote()).num_running == 1, 30, "the occupant to run")
        p = prompt(18, 100)
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        events, f = serve(handles, pid, WorkerRequest("no-room", p, params, handoff_to=did))
        assert tokens(events) == undisturbed(model_dir, p, params)
        result = last_handoff(ray_local, prefill)
        if room_comes:
            assert result.committed, result
            assert [a.worker_id for a in f.attempts] == [pid, did]
        else:
            assert result.outcome == "aborted" and result.error.startswith("no_room"), result
            assert [a.worker_id for a in f.attempts] == [pid]
        ray_local.get(full.abort.remote("occupant"))
        for ref in occupant:
            ray_local.get(ref)
        assert_all_free(ray_local, prefill, full)
    finally:
        stop(ray_local, prefill, full)


def test_a_prefill_worker_dying_mid_transfer_leaves_nothing_on_the_decode_worker(ray_local, model_dir):
    prefill = start(ray_local, "p-dies", model_dir, "prefill", max_num_batched_tokens=CHUNK)
    decode = start(ray_local, "d-waits", model_dir, "decode", kv_reservation_timeout_s=1.0)
    try:
        handles = {"p-dies": prefill, "d-waits": decode}
        p = prompt(19, 1500)

        def kill_when_sending() -> None:
            wait_until(lambda: incoming(ray_local, decode), 60, "the decode worker to reserve room")
            ray_local.kill(prefill)

        killer = threading.Thread(target=kill_when_sending)
        killer.start()
        # The router resumes the request on the decode worker itself, by recompute.
        events, f = serve(handles, "p-dies", WorkerRequest("orphaned", p, GREEDY, handoff_to="d-waits"),
                          fallback="d-waits")
        killer.join()
        assert tokens(events) == undisturbed(model_dir, p, GREEDY)
        assert [a.worker_id for a in f.attempts] == ["p-dies", "d-waits"]
        wait_until(lambda: not incoming(ray_local, decode), 30, "the stale reservation to expire")
        assert_all_free(ray_local, decode)
    finally:
        stop(ray_local, decode)


def test_tp2_prefill_hands_off_to_tp2_decode_rank_to_rank(ray_local, model_dir):
    """Each rank streams its shard of the KV to the same rank on the other side."""
    tp = dict(tensor_parallel_size=2, tp_cpus_per_rank=0.5, tp_timeout_s=20.0)
    prefill = start(ray_local, "p-tp2", model_dir, "prefill", max_num_batched_tokens=CHUNK, **tp)
    decode = start(ray_local, "d-tp2", model_dir, "decode", **tp)
    try:
        handles = {"p-tp2": prefill, "d-tp2": decode}
        p = prompt(21, 150)
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        events, f = serve(handles, "p-tp2", WorkerRequest("tp2", p, params, handoff_to="d-tp2"))
        assert tokens(events) == undisturbed(model_dir, p, params)  # TP=1, undisturbed
        assert [(a.worker_id, a.moved_in) for a in f.attempts] == [("p-tp2", False), ("d-tp2", True)]
        result = last_handoff(ray_local, prefill)
        assert result.committed and result.prefill_copy_s > 0, result
        assert_all_free(ray_local, prefill, decode)
    finally:
        stop(ray_local, prefill, decode)
