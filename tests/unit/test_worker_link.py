"""A router replica's multiplexed event stream from one worker, against a fake worker:
events reach the right request, a broken stream fails every request on it (after
the events that came first), and a caller that leaves aborts its request."""

from __future__ import annotations

import asyncio

import pytest

from router.worker_link import LinkBroken, WorkerLink
from workers.events import Finished, Tokens, Usage, WorkerRequest
from workers.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=4)


def request(rid: str) -> WorkerRequest:
    return WorkerRequest(rid, (1, 2, 3), PARAMS)


def done(rid: str, n: int) -> Finished:
    return Finished(rid, "length", None, Usage(3, n))


class FakeWorker:
    """`subscribe` streams whatever the test pushes into `batches`; an exception
    pushed there breaks the stream, as a dead actor does."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue = asyncio.Queue()
        self.submitted: list[tuple[str, str]] = []
        self.aborted: list[str] = []
        self.subscribe = _Method(self._subscribe)
        self.submit = _Method(self._submit)
        self.abort = _Method(self.aborted.append)

    async def _subscribe(self, channel_id: str):
        while True:
            batch = await self.batches.get()
            if isinstance(batch, Exception):
                raise batch
            yield _ready(batch)

    async def _submit(self, channel_id: str, req: WorkerRequest) -> None:
        self.submitted.append((channel_id, req.request_id))


class _Method:
    def __init__(self, fn) -> None:
        self.remote = fn


async def _ready(value):
    return value


async def collect(stream) -> list:
    return [e async for batch in stream for e in batch]


def test_events_reach_their_own_request():
    async def scenario():
        worker = FakeWorker()
        link = WorkerLink("w", worker)
        a = asyncio.ensure_future(collect(link.stream(request("a"))))
        b = asyncio.ensure_future(collect(link.stream(request("b"))))
        await asyncio.sleep(0.01)
        worker.batches.put_nowait([Tokens("a", 0, (5,), "x"), Tokens("b", 0, (7,), "y")])
        worker.batches.put_nowait([Tokens("b", 1, (8,), "z"), done("b", 2), Tokens("a", 1, (6,), "w")])
        worker.batches.put_nowait([done("a", 2)])
        return await a, await b, worker
    a, b, worker = asyncio.run(scenario())
    assert a == [Tokens("a", 0, (5,), "x"), Tokens("a", 1, (6,), "w"), done("a", 2)]
    assert b == [Tokens("b", 0, (7,), "y"), Tokens("b", 1, (8,), "z"), done("b", 2)]
    assert [rid for _, rid in worker.submitted] == ["a", "b"]
    assert len({channel for channel, _ in worker.submitted}) == 1
    assert worker.aborted == []  # both finished


def test_broken_stream_fails_every_request_after_what_came_first():
    async def scenario():
        worker = FakeWorker()
        link = WorkerLink("w", worker)
        got: dict[str, list] = {"a": [], "b": []}

        async def follow(rid):
            async for batch in link.stream(request(rid)):
                got[rid].extend(batch)
        tasks = [asyncio.ensure_future(follow(rid)) for rid in ("a", "b")]
        await asyncio.sleep(0.01)
        worker.batches.put_nowait([Tokens("a", 0, (5,), "x")])
        worker.batches.put_nowait(RuntimeError("actor died"))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(LinkBroken):  # a broken link takes no new request
            await collect(link.stream(request("c")))
        return got, results, link, worker
    got, results, link, worker = asyncio.run(scenario())
    assert got == {"a": [Tokens("a", 0, (5,), "x")], "b": []}
    assert all(isinstance(r, LinkBroken) and "actor died" in str(r) for r in results)
    assert "RuntimeError: actor died" in link.broken
    assert worker.aborted == []  # nothing to abort on a worker whose stream broke


def test_a_caller_that_leaves_aborts_its_request():
    async def scenario():
        worker = FakeWorker()
        link = WorkerLink("w", worker)
        stream = link.stream(request("a"))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        worker.batches.put_nowait([Tokens("a", 0, (5,), "x")])
        assert await first == [Tokens("a", 0, (5,), "x")]
        await stream.aclose()  # the client went away mid-stream
        return worker
    worker = asyncio.run(scenario())
    assert worker.aborted == ["a"]
