"""One router replica's connection to one worker: a single event stream for all the
requests the replica sends there.

Streaming each request separately costs a Ray message per request per decode step,
and on a busy node those messages cost the worker's cores. A link instead keeps one
`Worker.subscribe` stream open and starts requests with `Worker.submit`; every
batch it receives holds the events of one step (or of up to the worker's
stream_interval_s) for all of them, which the link hands to each request's own queue.

If the stream breaks (the worker died), every request on the link gets `LinkBroken`
after the events that came before it, so the request state machine resumes it
elsewhere; the broken link is not used again.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any, AsyncIterator, Optional

from workers.events import Event, Failed, Finished, Moved, WorkerRequest

# After one of these the request has nothing more to say through this link.
_ENDS_HERE = (Finished, Failed, Moved)

_link_numbers = itertools.count()


class LinkBroken(ConnectionError):
    """The worker's event stream ended or failed; the request did not finish there."""


class WorkerLink:
    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle
        # Unique per link: a worker never mixes two links' requests, even from one process.
        self.channel_id = f"{uuid.uuid4().hex[:12]}-{next(_link_numbers)}"
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._listener: Optional[asyncio.Task] = None
        self.broken: Optional[str] = None  # why the stream ended, once it has

    async def stream(self, request: WorkerRequest, attach: bool = False) -> AsyncIterator[list[Event]]:
        """The request's events in batches, the last ending with Finished, Failed or
        Moved. With `attach`, the request is already on the worker (it moved there):
        follow it instead of starting it. Raises LinkBroken if the worker's stream
        breaks first. Closing the iterator early aborts the request on the worker."""
        if self.broken is not None:
            raise LinkBroken(self.broken)
        self._listen()
        rid = request.request_id
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = queue
        ended = False
        try:
            if attach:
                await self.handle.attach.remote(self.channel_id, rid)
            else:
                await self.handle.submit.remote(self.channel_id, request)
            while not ended:
                batch = _drain(await queue.get(), queue)
                ended = isinstance(batch[-1], _ENDS_HERE)
                yield batch
        finally:
            self._queues.pop(rid, None)
            if not ended and self.broken is None:
                self.handle.abort.remote(rid)  # fire and forget: the caller has gone

    def close(self) -> None:
        """Stop listening (the worker left the snapshot); the worker aborts what was
        still running on this link."""
        if self._listener is not None:
            self._listener.cancel()

    def _listen(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        reason = "the worker ended its event stream"
        try:
            async for ref in self.handle.subscribe.remote(self.channel_id):
                for event in await ref:
                    queue = self._queues.get(event.request_id)
                    if queue is not None:
                        queue.put_nowait(event)
        except asyncio.CancelledError:
            reason = "the link was closed"
            raise
        except Exception as e:  # noqa: BLE001 - the actor died or the stream broke
            reason = f"{type(e).__name__}: {e}"
        finally:
            self.broken = reason
            for queue in self._queues.values():
                queue.put_nowait(LinkBroken(reason))


def _drain(first: Any, queue: "asyncio.Queue[Any]") -> list[Event]:
    """`first` and every event already queued behind it: one batch for the caller."""
    batch = []
    item = first
    while True:
        if isinstance(item, LinkBroken):
            if not batch:
                raise item
            queue.put_nowait(item)  # nothing follows it: the next call raises
            return batch
        batch.append(item)
        if isinstance(item, _ENDS_HERE) or queue.empty():
            return batch
        item = queue.get_nowait()
