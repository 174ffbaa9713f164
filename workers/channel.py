"""A worker's event channels: the events of every request that one listener (a router
replica's link, or one `generate` call) started there, released in batches.

A request's first output with text and its last event on the worker go out at once
(time to first token, end of stream, a move to another worker); the tokens between
at most every `stream_interval_s × streaming / full_at`, all of the channel's
requests in one message, so a token does not cost an actor round trip. The interval
follows the number of requests streaming, so the channel's chunks per second
(requests × messages, what the router and the proxy pay for per chunk) stay below
full_at / stream_interval_s: a few requests get their tokens step by step
(inter-token latency = time per token), and many get several tokens per chunk, so
that at saturation the relay does not take the cores from the engine. The interval
stops growing at `max_interval_s`, which bounds what the coalescing adds to
inter-token latency.
"""

from __future__ import annotations

import asyncio
import math
import time

from workers.events import Event, Failed, Finished, Moved, Tokens

# The events after which a request has nothing more to say on this worker.
ENDS_HERE = (Finished, Failed, Moved)


class ChannelClosed(RuntimeError):
    """A submit on a channel whose listener has gone: the caller must subscribe anew."""


class Channel:
    """The events of the requests submitted on one channel, released in batches: a
    request's first output with text and its last event go out at once (time to
    first token, end of stream), the rest at most every `interval`. Every batch takes everything
    pending, so one message carries a step (or a few) for all the channel's requests.
    Lives on the actor's event loop."""

    def __init__(self, channel_id: str, interval_s: float, full_at: int = 0,
                 max_interval_s: float = 0.0) -> None:
        self.channel_id = channel_id
        self.interval_s = interval_s
        self.full_at = full_at  # requests streaming at which interval_s applies (0: always)
        self.max_interval_s = max(interval_s, max_interval_s)  # the most it grows to beyond full_at
        self.requests: set[str] = set()  # submitted and not yet ended
        self._started: set[str] = set()  # requests that have sent an event
        self._pending: list[Event] = []
        self._urgent = False
        self._sent_at = -math.inf
        self._wake = asyncio.Event()

    def deliver(self, event: Event) -> None:
        self._pending.append(event)
        if isinstance(event, ENDS_HERE):
            self._urgent = True
            self._started.discard(event.request_id)
        elif event.request_id not in self._started:
            self._urgent = True
            # Started once it shows text: a first token that ends inside a UTF-8
            # character (or a possible stop string) shows none, so the next is urgent too.
            if not isinstance(event, Tokens) or event.text or event.logprobs:
                self._started.add(event.request_id)
        self._wake.set()

    @property
    def interval(self) -> float:
        """The interval that applies now: interval_s in proportion to the requests
        streaming against full_at, up to max_interval_s."""
        if not self.full_at:
            return self.interval_s
        return min(self.interval_s * len(self.requests) / self.full_at, self.max_interval_s)

    async def next_batch(self) -> list[Event]:
        while True:
            wait = None
            if self._pending:
                wait = 0.0 if self._urgent else self._sent_at + self.interval - time.monotonic()
                if wait <= 0:
                    break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
        batch, self._pending, self._urgent = self._pending, [], False
        self._sent_at = time.monotonic()
        return batch


def coalesce(batch: list[Event]) -> list[Event]:
    """Merge each request's consecutive Tokens events into one: fewer objects per
    actor reply. Events of one request keep their order."""
    merged: list[Event] = []
    last_of: dict[str, int] = {}  # request id → its last event's place in `merged`
    for event in batch:
        at = last_of.get(event.request_id)
        last = merged[at] if at is not None else None
        if isinstance(event, Tokens) and isinstance(last, Tokens):
            logprobs = None if last.logprobs is None else last.logprobs + (event.logprobs or ())
            merged[at] = Tokens(last.request_id, last.start_index, last.token_ids + event.token_ids,
                                last.text + event.text, logprobs)
        else:
            last_of[event.request_id] = len(merged)
            merged.append(event)
    return merged
