"""n choices: ids and seeds of their own, the first alone, the rest on its worker."""

from __future__ import annotations

import asyncio

import pytest

from router.choices import choice_requests, stream_choices
from workers import SamplingParams
from workers.events import Finished, Tokens, Usage, WorkerRequest


class FakeCore:
    """RouterCore's stream as choices use it: records where each request went."""

    def __init__(self) -> None:
        self.placed: dict[str, str] = {}
        self.calls: list[tuple[str, object, bool]] = []  # (request id, prefer, first choice has a token)
        self.first_token = asyncio.Event()

    async def stream(self, request: WorkerRequest, prefer=None):
        self.calls.append((request.request_id, prefer, self.first_token.is_set()))
        self.placed[request.request_id] = prefer or "w7"
        yield Tokens(request.request_id, 0, (11,), "a")
        if request.request_id.endswith("-0"):
            self.first_token.set()
            await asyncio.sleep(0)
        yield Finished(request.request_id, "length", None, Usage(5, 1, 0))
        del self.placed[request.request_id]


def test_each_choice_has_its_id_and_seed():
    request = WorkerRequest("cmpl-x", (1, 2, 3), SamplingParams(temperature=0.9, seed=40))
    assert choice_requests(request, 1) == [request]
    choices = choice_requests(request, 3)
    assert [c.request_id for c in choices] == ["cmpl-x-0", "cmpl-x-1", "cmpl-x-2"]
    assert [c.params.seed for c in choices] == [40, 41, 42]
    unseeded = choice_requests(WorkerRequest("r", (1,), SamplingParams(temperature=1.0)), 2)
    assert [c.params.seed for c in unseeded] == [None, None]


def test_the_other_choices_follow_the_first_to_its_worker_after_its_first_token():
    core = FakeCore()

    async def run():
        return [(i, type(e).__name__) async for i, e in
                stream_choices(core, choice_requests(WorkerRequest("r", (1,), SamplingParams()), 3))]

    events = asyncio.run(run())
    assert core.calls[0] == ("r-0", None, False)
    assert sorted(core.calls[1:]) == [("r-1", "w7", True), ("r-2", "w7", True)]
    assert sorted(events) == sorted([(i, kind) for i in range(3) for kind in ("Tokens", "Finished")])


def test_a_choices_error_stops_the_others():
    class Broken(FakeCore):
        async def stream(self, request, prefer=None):
            if request.request_id.endswith("-1"):
                raise RuntimeError("no worker")
            async for event in super().stream(request, prefer):
                yield event

    async def run():
        requests = choice_requests(WorkerRequest("r", (1,), SamplingParams()), 2)
        return [e async for e in stream_choices(Broken(), requests)]

    with pytest.raises(RuntimeError, match="no worker"):
        asyncio.run(run())
