"""Following one request from worker to worker.

The router forwards each absolute output index once: it drops tokens it already
sent and, when a worker dies mid-stream (or says it cannot take the request), asks
another worker to resume from the prompt plus the tokens already sent. When a worker
moves the request elsewhere with its KV (Moved), the router attaches to the
destination and goes on at the same index; a move is not a failed attempt. The
client sees no gap and no duplicate. Pure asyncio; the worker calls come in as
functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from router.dispatch import NoWorkerAvailable
from workers.events import Event, Failed, Finished, Moved, Tokens, WorkerRequest

# Failures another worker can fix; anything else (bad input) is the request's own.
# not_here: the request moved to a worker that no longer has it (it was aborted there).
RETRYABLE = frozenset({"worker_unhealthy", "draining", "not_here"})

PickWorker = Callable[[frozenset[str]], tuple[str, Any]]  # excluded ids → (worker id, its link)
LinkTo = Callable[[str], Any]  # worker id → its link: where a moved request went
# (link, request, attach) → the request's event batches on that worker
OpenStream = Callable[[Any, WorkerRequest, bool], AsyncIterator[list[Event]]]
WaitForWorker = Callable[[frozenset[str]], Awaitable[None]]  # excluded ids → returns when one may be free


@dataclass(slots=True)
class Attempt:
    worker_id: str
    moved_in: bool = False  # the request moved here with its KV: not a dispatch
    error: Optional[str] = None


class _MovedAway(Exception):
    def __init__(self, event: Moved) -> None:
        super().__init__(f"moved to {event.to_worker} at index {event.next_index}")
        self.event = event


class WorkerLost(Exception):
    """The worker's stream broke, or the worker declined: try another one."""


class RequestStream:
    def __init__(self, request: WorkerRequest, pick_worker: PickWorker, open_stream: OpenStream,
                 report_failure: Callable[[str], Awaitable[None]], max_attempts: int = 3,
                 link_to: Optional[LinkTo] = None, wait_for_worker: Optional[WaitForWorker] = None) -> None:
        self.request = request
        self.wait_for_worker = wait_for_worker
        self.pick_worker = pick_worker
        self.link_to = link_to
        self.open_stream = open_stream
        self.report_failure = report_failure
        self.max_attempts = max_attempts
        self.sent: list[int] = list(request.resume_token_ids)
        self.attempts: list[Attempt] = []

    async def events(self) -> AsyncIterator[Event]:
        """Tokens (deduplicated, contiguous) then one Finished or Failed."""
        excluded: set[str] = set()
        moved: Optional[Moved] = None
        while moved is not None or sum(not a.moved_in for a in self.attempts) < self.max_attempts:
            if moved is not None and self.link_to is not None:
                worker_id, link = moved.to_worker, self.link_to(moved.to_worker)
            else:
                worker_id, link = await self._next_worker(frozenset(excluded))
            self.attempts.append(Attempt(worker_id, moved_in=moved is not None))
            resumed = dataclasses.replace(self.request, resume_token_ids=tuple(self.sent))
            try:
                async for event in self._follow(link, resumed, attach=moved is not None):
                    yield event
                return
            except _MovedAway as away:
                moved = away.event
            except WorkerLost as e:
                moved = None
                self.attempts[-1].error = str(e)
                excluded.add(worker_id)
                await self.report_failure(worker_id)
        tried = ", ".join(f"{a.worker_id} ({a.error})" for a in self.attempts if a.error)
        yield Failed(self.request.request_id, "worker_unhealthy", f"no worker could finish the request; tried {tried}")

    async def _next_worker(self, excluded: frozenset[str]) -> tuple[str, Any]:
        """The worker for the next attempt. A retry that finds none left (the request's
        only worker died) first waits, through wait_for_worker, for the cluster to start
        another: the request resumes there instead of failing. A new request never waits
        (it gets its 503 at once)."""
        try:
            return self.pick_worker(excluded)
        except NoWorkerAvailable:
            if not self.attempts or self.wait_for_worker is None:
                raise
        await self.wait_for_worker(excluded)
        return self.pick_worker(excluded)

    async def _follow(self, link: Any, request: WorkerRequest, attach: bool) -> AsyncIterator[Event]:
        try:
            async for batch in self.open_stream(link, request, attach):
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
                    elif isinstance(event, Moved):
                        if event.next_index > len(self.sent):
                            raise WorkerLost(f"moved at index {event.next_index}, but only {len(self.sent)} "
                                             f"tokens arrived")
                        raise _MovedAway(event)
        except (WorkerLost, _MovedAway):
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
