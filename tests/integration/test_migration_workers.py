"""Live migration between two worker actors, followed by the router's own request
state machine (RequestStream over WorkerLinks): exact output, refusals, a dead
destination, a late abort, and two migrations of one request at once."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Optional

import pytest
from conditions import wait_until
from worker_streams import (LONG, SEEDED, Follower, assert_all_free, order, prompt, run, start, tokens,
                            undisturbed)

from router.worker_link import WorkerLink
from workers.events import Finished, Moved, Tokens, WorkerRequest


@pytest.fixture(scope="module")
def model_dir(make_model):
    return str(make_model("tiny-llama"))


@pytest.fixture(scope="module")
def workers(ray_local, model_dir):
    handles = {"src": start(ray_local, "src", model_dir), "dst": start(ray_local, "dst", model_dir)}
    yield handles
    for h in handles.values():
        ray_local.get(h.shutdown.remote())
        ray_local.kill(h)


@pytest.mark.parametrize("params", [LONG, SEEDED], ids=["greedy", "seeded"])
def test_request_moves_mid_stream_and_ends_exactly(ray_local, workers, model_dir, params):
    p = prompt(1, 40)
    want = undisturbed(model_dir, p, params)
    other = workers["dst"].generate.remote(WorkerRequest("dst-own", prompt(2, 50), LONG))  # dst's blocks differ
    rid = f"moving-{params.seed}"
    f = Follower(workers, "src")
    events, (result,) = run(f.run(WorkerRequest(rid, p, params), 20, [order(workers, rid, f"m-{rid}")], "src"))
    assert result.committed, result
    assert result.stages >= 1 and result.blocks >= 3 and result.bytes > 0
    assert tokens(events) == want
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 300
    assert [(a.worker_id, a.moved_in, a.error) for a in f.attempts] == [("src", False, None), ("dst", True, None)]
    assert f.failures == []
    for ref in other:
        ray_local.get(ref)
    assert_all_free(ray_local, workers["src"], workers["dst"])


def test_two_migrations_of_one_request_commit_once(ray_local, workers, model_dir):
    p = prompt(3, 30)
    want = undisturbed(model_dir, p, LONG)
    f = Follower(workers, "src")
    events, results = run(f.run(WorkerRequest("twice", p, LONG), 10,
                                [order(workers, "twice", "m-a"), order(workers, "twice", "m-b")], "src"))
    assert sorted(r.outcome for r in results) == ["aborted", "committed"]
    refused = next(r for r in results if not r.committed)
    assert refused.error.startswith("busy") or refused.error.startswith("unknown"), refused.error
    assert tokens(events) == want
    assert_all_free(ray_local, workers["src"], workers["dst"])


def test_refused_destination_leaves_the_request_running(ray_local, workers, model_dir):
    other = start(ray_local, "other-layout", model_dir, block_size=8)
    try:
        handles = {**workers, "other-layout": other}
        p = prompt(4, 30)
        want = undisturbed(model_dir, p, LONG)
        f = Follower(handles, "src")
        events, (result,) = run(f.run(WorkerRequest("stays", p, LONG), 10,
                                      [order(handles, "stays", "m-layout", "other-layout")], "src"))
        assert result.outcome == "aborted"
        assert "block_size differs: source has 16, destination 8" in result.error
        assert tokens(events) == want
        assert [a.worker_id for a in f.attempts] == ["src"]
        assert_all_free(ray_local, workers["src"], other)
    finally:
        ray_local.kill(other)


def test_draining_destination_refuses(ray_local, workers, model_dir):
    drained = start(ray_local, "drained", model_dir)
    try:
        ray_local.get(drained.set_draining.remote(True))
        handles = {**workers, "drained": drained}
        p = prompt(5, 30)
        f = Follower(handles, "src")
        events, (result,) = run(f.run(WorkerRequest("nowhere", p, LONG), 10,
                                      [order(handles, "nowhere", "m-drained", "drained")], "src"))
        assert result.outcome == "aborted" and "not taking migrations (draining)" in result.error
        assert tokens(events) == undisturbed(model_dir, p, LONG)
    finally:
        ray_local.kill(drained)


def test_dead_destination_fails_the_migration_not_the_request(ray_local, workers, model_dir):
    dead = start(ray_local, "dead", model_dir)
    ray_local.kill(dead)
    handles = {**workers, "dead": dead}
    p = prompt(6, 30)
    f = Follower(handles, "src")
    events, (result,) = run(f.run(WorkerRequest("survives", p, SEEDED), 10,
                                  [order(handles, "survives", "m-dead", "dead")], "src"))
    assert result.outcome == "failed" and "Actor" in result.error
    assert tokens(events) == undisturbed(model_dir, p, SEEDED)
    assert_all_free(ray_local, workers["src"])


def test_source_dying_mid_migration_fails_over_by_recompute(ray_local, workers, model_dir):
    """The source dies while it migrates: the router's stream breaks, the request is
    recomputed on another worker from the tokens it had, and the destination's
    reservation expires: nothing lost, no block leaked."""
    doomed = start(ray_local, "doomed", model_dir)
    receiver = start(ray_local, "receiver", model_dir, kv_reservation_timeout_s=2.0)
    try:
        handles = {**workers, "doomed": doomed, "receiver": receiver}
        p = prompt(8, 2000)
        f = Follower(handles, "doomed", fallback="dst")

        async def kill_the_source() -> None:
            await asyncio.sleep(0.02)  # the migration is under way (a 2,000-token request: many blocks)
            ray_local.kill(doomed)

        events, (result,) = run(f.run(WorkerRequest("orphan", p, SEEDED), 10,
                                      [order(handles, "orphan", "m-orphan", "receiver")], "doomed",
                                      then=kill_the_source))
        assert tokens(events) == undisturbed(model_dir, p, SEEDED)
        assert isinstance(result, Exception)  # the source died inside its migrate call
        # Before the commit the router recomputes on dst; after it, it follows the
        # request to receiver: either way nothing is lost.
        assert [a.worker_id for a in f.attempts] in (["doomed", "dst"], ["doomed", "receiver"]), f.attempts
        wait_for_free(ray_local, receiver)
        if [a.worker_id for a in f.attempts] == ["doomed", "dst"]:
            assert f.failures == ["doomed"]
        assert_all_free(ray_local, receiver, workers["dst"])
    finally:
        ray_local.kill(receiver)


def test_unknown_request_is_refused(ray_local, workers):
    result = ray_local.get(workers["src"].migrate.remote(order(workers, "ghost", "m-ghost")))
    assert result.outcome == "aborted" and result.error == "unknown: no request 'ghost' in this engine"


def test_late_abort_at_the_source_follows_the_request(ray_local, workers):
    """The client left just as the request moved: its abort reaches the source after
    the move, and the source forwards it to the destination."""

    async def scenario() -> Optional[Finished]:
        link = WorkerLink("src", workers["src"])
        request = WorkerRequest("leaver", prompt(7, 30), LONG)
        moved = None
        async for batch in link.stream(request):
            if moved is None:
                moved = asyncio.ensure_future(workers["src"].migrate.remote(order(workers, "leaver", "m-leaver")))
            if batch and type(batch[-1]).__name__ == "Moved":
                break
        assert (await moved).committed
        await workers["src"].abort.remote("leaver")  # late: the request is at dst now
        follow = WorkerLink("dst", workers["dst"])
        ends = [e async for b in follow.stream(request, attach=True) for e in b if isinstance(e, Finished)]
        link.close()
        follow.close()
        return ends[-1] if ends else None

    end = run(scenario())
    assert end is not None and end.reason == "abort"
    assert_all_free(ray_local, workers["src"], workers["dst"])


async def moved_unseen(workers, request: WorkerRequest) -> list[int]:
    """Start `request` on src and move it to dst after 10 tokens; the router never
    attaches there, as if src died before its Moved event arrived. Returns the tokens
    src sent."""
    link, got, moving = WorkerLink("src", workers["src"]), [], None
    async for batch in link.stream(request):
        for event in batch:
            if isinstance(event, Tokens):
                assert event.start_index == len(got)
                got.extend(event.token_ids)
            if isinstance(event, Moved):
                assert event.next_index == len(got)
        if moving is None and len(got) >= 10:
            rid = request.request_id
            moving = asyncio.ensure_future(workers["src"].migrate.remote(order(workers, rid, f"m-{rid}")))
    assert (await moving).committed
    link.close()
    return got


async def resume(worker: Any, worker_id: str, request: WorkerRequest, sent: list[int]) -> list[Any]:
    link = WorkerLink(worker_id, worker)
    try:
        resumed = dataclasses.replace(request, resume_token_ids=tuple(sent))
        return [e async for batch in link.stream(resumed) for e in batch]
    finally:
        link.close()


def test_a_move_whose_moved_event_was_lost_is_resumed_at_its_destination(ray_local, workers, model_dir):
    """The source committed a move and died before its Moved reached the router, which
    then resumes the request elsewhere from the tokens it has. Sent to the
    destination, where the request runs on, the resumption attaches to it: exact
    output. Another request under the same id is refused there; a resumption with
    fewer tokens than the move carried is refused as not_here (the router tries
    another worker), and the moved request dropped."""
    p = prompt(9, 40)
    request = WorkerRequest("moved-unseen", p, SEEDED)

    async def scenario() -> tuple[list[int], list[Any], list[Any]]:
        sent = await moved_unseen(workers, request)
        other = await resume(workers["dst"], "dst", dataclasses.replace(request, prompt_token_ids=prompt(10, 40)),
                             sent)
        return sent, other, await resume(workers["dst"], "dst", request, sent)

    sent, other, events = run(scenario())
    assert [(type(e).__name__, e.code) for e in other] == [("Failed", "invalid_request")]
    assert "already running here" in other[0].message
    assert tokens([Tokens("", 0, tuple(sent), "")] + events) == undisturbed(model_dir, p, SEEDED)
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 300

    short = WorkerRequest("moved-unseen-short", prompt(11, 40), LONG)

    async def short_scenario() -> list[Any]:
        sent = await moved_unseen(workers, short)
        return await resume(workers["dst"], "dst", short, sent[:-1])

    refused = run(short_scenario())
    assert [(type(e).__name__, e.code) for e in refused] == [("Failed", "not_here")], refused
    wait_for_free(ray_local, workers["dst"])
    assert_all_free(ray_local, workers["src"], workers["dst"])


def wait_for_free(ray_local: Any, worker: Any, timeout_s: float = 10) -> None:
    """Until the worker holds no block (a dropped request's blocks free as it steps)."""
    def free() -> bool:
        report = ray_local.get(worker.load.remote())
        return report.free_blocks == report.total_blocks and not report.requests
    wait_until(free, timeout_s, "every block free on the worker")
