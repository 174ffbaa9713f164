"""The router's per-request state machine with fake workers: dedup, resume, give up."""

from __future__ import annotations

import asyncio

from router.lifecycle import RequestStream
from workers.events import Failed, Finished, Tokens, Usage, WorkerRequest
from workers.sampling_params import SamplingParams

REQ = WorkerRequest("r", (1, 2, 3), SamplingParams(max_tokens=6))
USAGE = Usage(3, 6)


def script(*batches):
    """A fake worker: records the request it got, then streams the batches; an
    Exception instance in the script is raised there (the actor died)."""
    calls = []

    async def stream(request):
        calls.append(request)
        for batch in batches:
            if isinstance(batch, Exception):
                raise batch
            yield batch
    return stream, calls


def run(workers: dict):
    failures = []
    order = list(workers)

    def pick(excluded):
        wid = next(w for w in order if w not in excluded)
        return wid, workers[wid][0]

    async def report(wid):
        failures.append(wid)

    async def collect():
        stream = RequestStream(REQ, pick, lambda handle, req: handle(req), report)
        return [e async for e in stream.events()]
    return asyncio.run(collect()), failures


def test_resumes_on_another_worker_without_gap_or_duplicate():
    a, a_calls = script([Tokens("r", 0, (10, 11), "ab")], [Tokens("r", 2, (12,), "c")], RuntimeError("actor died"))
    b, b_calls = script([Tokens("r", 2, (12,), "c"), Tokens("r", 3, (13, 14, 15), "def")],
                        [Finished("r", "length", None, USAGE)])
    events, failures = run({"a": (a, a_calls), "b": (b, b_calls)})
    tokens = [t for e in events if isinstance(e, Tokens) for t in e.token_ids]
    assert tokens == [10, 11, 12, 13, 14, 15]
    assert [e.start_index for e in events if isinstance(e, Tokens)] == [0, 2, 3]
    assert b_calls[0].resume_token_ids == (10, 11, 12)
    assert failures == ["a"]
    assert events[-1] == Finished("r", "length", None, USAGE)


def test_bad_input_is_not_retried():
    a, _ = script([Failed("r", "invalid_request", "prompt too long")])
    b, b_calls = script([Finished("r", "length", None, USAGE)])
    events, failures = run({"a": (a, []), "b": (b, b_calls)})
    assert events == [Failed("r", "invalid_request", "prompt too long")]
    assert failures == [] and b_calls == []


def test_draining_worker_hands_over_and_gives_up_after_max_attempts():
    dead = [script(RuntimeError(f"down {i}"))[0] for i in range(3)]
    draining, _ = script([Failed("r", "draining", "worker is draining")])
    events, failures = run({"w0": (draining, []), "w1": (dead[0], []), "w2": (dead[1], [])})
    assert failures == ["w0", "w1", "w2"]
    assert len(events) == 1 and events[0].code == "worker_unhealthy"
    assert "w0 (worker is draining)" in events[0].message and "w2 (RuntimeError: down 1)" in events[0].message
