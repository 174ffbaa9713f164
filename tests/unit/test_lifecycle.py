"""The router's per-request state machine with fake workers: dedup, resume, give up."""

from __future__ import annotations

import asyncio

import pytest

from router.dispatch import NoWorkerAvailable
from router.lifecycle import RequestStream
from workers.events import Failed, Finished, Moved, Tokens, Usage, WorkerRequest
from workers.sampling_params import SamplingParams

REQ = WorkerRequest("r", (1, 2, 3), SamplingParams(max_tokens=6))
USAGE = Usage(3, 6)


def script(*batches):
    """A fake worker: records the request it got, then streams the batches; an
    Exception instance in the script is raised there (the actor died)."""
    calls = []

    async def stream(request, attach=False):
        calls.append((request, attach) if attach else request)
        for batch in batches:
            if isinstance(batch, Exception):
                raise batch
            yield batch
    return stream, calls


def run(workers: dict, max_attempts: int = 3, dispatch_order: list | None = None):
    failures = []
    order = dispatch_order or list(workers)

    def pick(excluded):
        wid = next(w for w in order if w not in excluded)
        if dispatch_order:
            order.remove(wid)  # each listed worker is dispatched to once
        return wid, workers[wid][0]

    async def report(wid):
        failures.append(wid)

    async def collect():
        stream = RequestStream(REQ, pick, lambda handle, req, attach: handle(req, attach), report, max_attempts,
                               link_to=lambda wid: workers[wid][0])
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


def test_moved_request_is_followed_at_the_same_index_and_is_not_an_attempt():
    a, a_calls = script([Tokens("r", 0, (10, 11), "ab")], [Tokens("r", 2, (12,), "c"), Moved("r", "b", 3)])
    # The destination's tokens made before the router attached arrive first, whole.
    b, b_calls = script([Tokens("r", 3, (13, 14), "de"), Tokens("r", 5, (15,), "f")],
                        [Finished("r", "length", None, USAGE)])
    c, c_calls = script(RuntimeError("never asked"))
    events, failures = run({"a": (a, a_calls), "b": (b, b_calls), "c": (c, c_calls)}, max_attempts=1,
                           dispatch_order=["a", "c"])
    assert [t for e in events if isinstance(e, Tokens) for t in e.token_ids] == [10, 11, 12, 13, 14, 15]
    assert "".join(e.text for e in events if isinstance(e, Tokens)) == "abcdef"
    assert events[-1] == Finished("r", "length", None, USAGE)
    assert failures == [] and c_calls == []
    (request, attach), = b_calls
    assert attach and request.resume_token_ids == (10, 11, 12)


def test_move_that_would_leave_a_gap_resumes_by_recompute_instead():
    a, _ = script([Tokens("r", 0, (10,), "a"), Moved("r", "b", 3)])
    b, b_calls = script(RuntimeError("not attached"))
    c, c_calls = script([Tokens("r", 1, (11, 12), "bc")], [Finished("r", "length", None, USAGE)])
    events, failures = run({"a": (a, []), "b": (b, b_calls), "c": (c, c_calls)}, dispatch_order=["a", "c"])
    assert [t for e in events if isinstance(e, Tokens) for t in e.token_ids] == [10, 11, 12]
    assert failures == ["a"] and b_calls == []
    assert c_calls[0].resume_token_ids == (10,)


def test_destination_that_lost_the_request_makes_the_router_resume_elsewhere():
    a, _ = script([Tokens("r", 0, (10,), "a"), Moved("r", "b", 1)])
    b, _ = script([Failed("r", "not_here", "request 'r' is not on worker b")])
    c, c_calls = script([Tokens("r", 1, (11,), "b")], [Finished("r", "length", None, USAGE)])
    events, failures = run({"a": (a, []), "b": (b, []), "c": (c, c_calls)}, dispatch_order=["a", "c"])
    assert [t for e in events if isinstance(e, Tokens) for t in e.token_ids] == [10, 11]
    assert failures == ["b"]


def run_with_replacement(first_pick_has_worker: bool = True):
    """Worker a dies after two tokens with no other worker known; the wait for one
    brings b (the cluster replaced a). Returns the events, the waits' excluded sets,
    and what b was asked."""
    a, _ = script([Tokens("r", 0, (10, 11), "ab")], RuntimeError("actor died"))
    b, b_calls = script([Tokens("r", 2, (12, 13, 14, 15), "cdef")], [Finished("r", "length", None, USAGE)])
    known = {"a": a} if first_pick_has_worker else {}
    waits = []

    def pick(excluded):
        free = [w for w in known if w not in excluded]
        if not free:
            raise NoWorkerAvailable(f"none of {sorted(known)} outside {sorted(excluded)}")
        return free[0], known[free[0]]

    async def wait_for_worker(excluded):
        waits.append(excluded)
        known["b"] = b

    async def report(wid):
        pass

    async def collect():
        stream = RequestStream(REQ, pick, lambda handle, req, attach: handle(req, attach), report, 3,
                               wait_for_worker=wait_for_worker)
        return [e async for e in stream.events()]
    return asyncio.run(collect()), waits, b_calls


def test_a_retry_with_no_worker_left_waits_for_a_replacement_and_resumes_there():
    events, waits, b_calls = run_with_replacement()
    assert [t for e in events if isinstance(e, Tokens) for t in e.token_ids] == [10, 11, 12, 13, 14, 15]
    assert events[-1] == Finished("r", "length", None, USAGE)
    assert waits == [frozenset({"a"})]
    assert b_calls[0].resume_token_ids == (10, 11)


def test_a_new_request_with_no_worker_does_not_wait():
    with pytest.raises(NoWorkerAvailable):
        run_with_replacement(first_pick_has_worker=False)
