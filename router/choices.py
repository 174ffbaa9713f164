"""`n` choices for one request, prefilled once.

The first choice goes out alone. Once it has produced a token, its worker holds the
prompt's KV blocks in its prefix cache, and the other choices go to that worker: they
hit the cache for every full block of the prompt instead of computing it again. Each
choice is a request of its own (its own id, `<id>-<i>`, and with a seed, its own
seed + i, so that seeded choices differ and stay reproducible); their events come out
merged, tagged with the choice's index.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator, Optional

from workers.events import Event, WorkerRequest

_DONE = object()  # a choice's stream ended


def choice_requests(request: WorkerRequest, n: int) -> list[WorkerRequest]:
    """The n requests of n choices (just `request` when n is 1)."""
    if n == 1:
        return [request]
    params = request.params
    return [dataclasses.replace(
        request, request_id=f"{request.request_id}-{i}",
        params=params if params.seed is None else dataclasses.replace(params, seed=params.seed + i))
        for i in range(n)]


async def stream_choices(core: Any, requests: list[WorkerRequest]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) of every choice, as they come; raises what a choice's
    stream raises (NoWorkerAvailable), the other choices stopped."""
    if len(requests) == 1:
        async for event in core.stream(requests[0]):
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    first_event = asyncio.Event()  # of the first choice: its prompt is in a prefix cache now
    first_worker: list[Optional[str]] = [None]  # where the first choice ran then

    async def run(index: int, request: WorkerRequest, prefer: Optional[str]) -> None:
        try:
            async for event in core.stream(request, prefer=prefer):
                if not first_event.is_set():
                    first_worker[0] = core.placed.get(request.request_id)
                    first_event.set()
                await queue.put((index, event))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, e))
        finally:
            first_event.set()
            await queue.put((index, _DONE))

    tasks = [asyncio.ensure_future(run(0, requests[0], None))]
    try:
        await first_event.wait()
        tasks += [asyncio.ensure_future(run(i, r, first_worker[0])) for i, r in enumerate(requests[1:], start=1)]
        running = len(requests)
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
