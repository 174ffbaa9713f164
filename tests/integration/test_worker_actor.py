"""The worker actor on a local Ray: streamed events, abort, bad input, resume, load."""

from __future__ import annotations

import random

import pytest

from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.events import Failed, Finished, Tokens, WorkerRequest
from workers.worker import Worker, WorkerConfig

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompt(seed: int, n: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(4, 1000) for _ in range(n))


@pytest.fixture(scope="module")
def model_dir(make_model):
    return str(make_model("tiny-llama"))


@pytest.fixture(scope="module")
def worker(ray_local, model_dir):
    actor = ray_local.remote(Worker).remote(WorkerConfig("w0", EngineConfig(model=model_dir)))
    yield actor
    ray_local.get(actor.shutdown.remote())
    ray_local.kill(actor)


def stream(ray, worker, request: WorkerRequest) -> list:
    events = []
    for ref in worker.generate.remote(request):
        events.extend(ray.get(ref))
    return events


def tokens_of(events: list, first_index: int = 0) -> list[int]:
    out: list[int] = []
    for e in events:
        if isinstance(e, Tokens):
            assert e.start_index == first_index + len(out)  # absolute, no gap, no repeat
            out.extend(e.token_ids)
    return out


def test_stream_matches_offline_engine(ray_local, worker, model_dir):
    p = prompt(1, 30)
    expected = LLM(model=model_dir).generate([list(p)], GREEDY)[0]
    events = stream(ray_local, worker, WorkerRequest("a", p, GREEDY))
    assert tokens_of(events) == expected.token_ids
    assert "".join(e.text for e in events if isinstance(e, Tokens)) == expected.text
    assert events[-1] == Finished("a", "length", None, events[-1].usage)
    assert (events[-1].usage.prompt_tokens, events[-1].usage.completion_tokens) == (30, 24)


def test_bad_request_fails_alone_while_another_streams(ray_local, worker):
    good = worker.generate.remote(WorkerRequest("good", prompt(2, 20), GREEDY))
    bad = stream(ray_local, worker, WorkerRequest("bad", (1, 99999), GREEDY))
    assert len(bad) == 1 and isinstance(bad[0], Failed) and bad[0].code == "invalid_request"
    assert "prompt_token_ids holds 99999" in bad[0].message
    events = [e for ref in good for e in ray_local.get(ref)]
    assert len(tokens_of(events)) == 24 and isinstance(events[-1], Finished)


def test_abort_mid_stream_and_blocks_come_back(ray_local, worker):
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    gen = worker.generate.remote(WorkerRequest("long", prompt(3, 10), long))
    first = ray_local.get(next(gen))
    assert isinstance(first[0], Tokens)
    ray_local.get(worker.abort.remote("long"))
    rest = [e for ref in gen for e in ray_local.get(ref)]
    assert isinstance(rest[-1], Finished) and rest[-1].reason == "abort"
    report = ray_local.get(worker.load.remote())
    assert report.free_blocks == report.total_blocks and report.num_running == 0


def test_resume_continues_exactly(ray_local, worker, model_dir):
    p = prompt(4, 25)
    full = tokens_of(stream(ray_local, worker, WorkerRequest("full", p, GREEDY)))
    resumed = stream(ray_local, worker, WorkerRequest("again", p, GREEDY, resume_token_ids=tuple(full[:10])))
    assert tokens_of(resumed, first_index=10) == full[10:]
    assert resumed[-1].usage.completion_tokens == 24


def test_load_report_counts_cached_blocks(ray_local, worker):
    report = ray_local.get(worker.load.remote())
    assert report.worker_id == "w0" and report.role == "mixed" and report.healthy
    assert len(report.cached_block_hashes) > 0  # earlier prompts left full blocks cached
    assert report.freeness == report.free_blocks * 16 / 1
    assert ray_local.get(worker.health.remote()) == (True, "ok")


def test_drain_finishes_running_and_refuses_new(ray_local, model_dir):
    actor = ray_local.remote(Worker).remote(WorkerConfig("w1", EngineConfig(model=model_dir)))
    try:
        running = actor.generate.remote(WorkerRequest("r", prompt(5, 12), GREEDY))
        first = ray_local.get(next(running))
        remaining = ray_local.get(actor.drain.remote(timeout_s=30))
        events = first + [e for ref in running for e in ray_local.get(ref)]
        assert remaining == 0 and len(tokens_of(events)) == 24
        refused = stream(ray_local, actor, WorkerRequest("late", prompt(6, 5), GREEDY))
        assert [type(e) for e in refused] == [Failed] and refused[0].code == "draining"
    finally:
        ray_local.get(actor.shutdown.remote())
        ray_local.kill(actor)


def test_one_channel_carries_many_requests_and_closing_it_aborts_them(ray_local, worker):
    import time

    p, q = prompt(7, 18), prompt(8, 9)
    alone = {rid: tokens_of(stream(ray_local, worker, WorkerRequest(f"alone-{rid}", ids, GREEDY)))
             for rid, ids in (("p", p), ("q", q))}
    channel = worker.subscribe.remote("router-1")
    ray_local.get([worker.submit.remote("router-1", WorkerRequest("p", p, GREEDY)),
                   worker.submit.remote("router-1", WorkerRequest("q", q, GREEDY))])
    events: dict[str, list] = {"p": [], "q": []}
    while not all(evs and isinstance(evs[-1], Finished) for evs in events.values()):
        for e in ray_local.get(next(channel)):
            events[e.request_id].append(e)
    assert {rid: tokens_of(evs) for rid, evs in events.items()} == alone

    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    ray_local.get(worker.submit.remote("router-1", WorkerRequest("long", prompt(9, 10), long)))
    assert isinstance(ray_local.get(next(channel))[0], Tokens)
    cancelled_at = time.time()
    ray_local.cancel(channel)  # the router replica went away
    # A report made after the cancel: one from before the long request was added
    # (reports refresh every few steps) also shows nothing running.
    deadline = time.monotonic() + 30
    report = ray_local.get(worker.load.remote())
    while (report.reported_at <= cancelled_at or report.num_running) and time.monotonic() < deadline:
        time.sleep(0.05)
        report = ray_local.get(worker.load.remote())
    assert report.reported_at > cancelled_at
    assert report.num_running == 0 and report.free_blocks == report.total_blocks
    with pytest.raises(Exception, match="channel 'router-1' is closed"):
        ray_local.get(worker.submit.remote("router-1", WorkerRequest("late", p, GREEDY)))


def test_rays_worker_processes_run_at_nice_0(ray_local):
    """Ray starts them at nice 15 unless told (cluster/serve_env.py says why we tell it)."""
    import os

    assert ray_local.get(ray_local.remote(lambda: os.nice(0)).remote()) == 0
