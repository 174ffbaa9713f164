"""Following one request from worker to worker.

The router forwards each absolute output index once: it drops tokens it already
sent and, when a worker dies mid-stream (or says it cannot take the request), asks
another worker to resume from the prompt plus the tokens already sent. The client
sees no gap and no duplicate. Pure asyncio; the worker calls come in as a function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from workers.events import Event, Failed, Finished, Tokens, WorkerRequest

# Failures another worker can fix; anything else (bad input) is the request's own.
RETRYABLE = frozenset({"worker_unhealthy", "draining"})

PickWorker = Callable[[frozenset[str]], tuple[str, Any]]  # excluded ids → (worker id, its link)
OpenStream = Callable[[Any, WorkerRequest], AsyncIterator[list[Event]]]


@dataclass(slots=True)
class Attempt:
    worker_id: str
    error: Optional[str] = None


class WorkerLost(Exception):
    """The worker's stream broke, or the worker declined: try another one."""


class RequestStream:
    def __init__(self, request: WorkerRequest, pick_worker: PickWorker, open_stream: OpenStream,
                 report_failure: Callable[[str], Awaitable[None]], max_attempts: int = 3) -> None:
        self.request = request
        self.pick_worker = pick_worker
        self.open_stream = open_stream
        self.report_failure = report_failure
        self.max_attempts = max_attempts
        self.sent: list[int] = list(request.resume_token_ids)
        self.attempts: list[Attempt] = []

    async def events(self) -> AsyncIterator[Event]:
        """Tokens (deduplicated, contiguous) then one Finished or Failed."""
        excluded: set[str] = set()
        while len(self.attempts) < self.max_attempts:
            worker_id, handle = self.pick_worker(frozenset(excluded))
            self.attempts.append(Attempt(worker_id))
            resumed = dataclasses.replace(self.request, resume_token_ids=tuple(self.sent))
            try:
                async for event in self._follow(handle, resumed):
                    yield event
                return
            except WorkerLost as e:
                self.attempts[-1].error = str(e)
                excluded.add(worker_id)
                await self.report_failure(worker_id)
        tried = ", ".join(f"{a.worker_id} ({a.error})" for a in self.attempts)
        yield Failed(self.request.request_id, "worker_unhealthy", f"no worker could finish the request; tried {tried}")

    async def _follow(self, handle: Any, request: WorkerRequest) -> AsyncIterator[Event]:
        try:
            async for batch in self.open_stream(handle, request):
                for event in batch:
                    if isinstance(event, Tokens):
                        fresh = self._fresh(event)
                        if fresh is not None:
                            yield fresh
                    elif isinstance(event, Failed) and event.code in RETRYABLE:
                        raise WorkerLost(event.message)
                    elif isinstance(event, (Finished, Failed)):
                        yield event
                        return
                    else:
                        # Moved arrives once live migration lands; until then it is a
                        # protocol error, and resuming elsewhere keeps the request alive.
                        raise WorkerLost(f"unexpected event {type(event).__name__}")
        except WorkerLost:
            raise
        except Exception as e:  # the actor died or the stream broke
            raise WorkerLost(f"{type(e).__name__}: {e}") from e
        raise WorkerLost("stream ended without Finished")

    def _fresh(self, event: Tokens) -> Optional[Tokens]:
        """The part of `event` past what was already sent, or None."""
        already = len(self.sent) - event.start_index
        if already < 0:
            raise WorkerLost(f"gap in the stream: got index {event.start_index}, expected {len(self.sent)}")
        if already >= len(event.token_ids):
            return None
        if already:
            # A partial overlap carries text for tokens already sent; keep it whole
            # rather than guess how the text splits. Workers send whole steps, so
            # this happens only across a resume, where indexes start fresh anyway.
            raise WorkerLost(f"overlapping stream at index {event.start_index}")
        self.sent.extend(event.token_ids)
        return event
