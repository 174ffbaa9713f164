"""A discrete-event loop: callbacks at simulated times, run in time order.

Events at the same time run in the order they were scheduled, so a run is a pure
function of its inputs.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self.events_run = 0

    def clock(self) -> float:
        return self.now

    def at(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        if when < self.now:
            raise ValueError(f"cannot schedule an event at {when}, before now ({self.now})")
        heapq.heappush(self._queue, (when, next(self._order), fn, args))

    def after(self, delay_s: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay_s, fn, *args)

    def run(self, until: float = float("inf")) -> None:
        """Until no event is left, or the next is later than `until` (the clock then
        stops at `until`)."""
        queue = self._queue
        while queue and queue[0][0] <= until:
            when, _, fn, args = heapq.heappop(queue)
            self.now = when
            self.events_run += 1
            fn(*args)
        if queue:
            self.now = until
