"""The healthy workers ordered by a least-key policy's key (router/dispatch.py's
LeastKeyPolicy): a heap in which a worker's changed load is pushed anew and its stale
entries are dropped when they reach the top. A router of a thousand workers finds the
least-loaded one in O(log W) per request instead of a pass over them all.

Pure Python, kept by the load book (router/load_book.py).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Mapping, Optional

from router.load import WorkerLoad


class LeastIndex:
    def __init__(self, key: Callable[[WorkerLoad], Any], loads: Mapping[str, WorkerLoad]) -> None:
        self.key = key
        self._order = itertools.count()  # a worker's entries never compare their loads
        self._heap: list[tuple[Any, int, WorkerLoad]] = []
        self.rebuild(loads)

    def rebuild(self, loads: Mapping[str, WorkerLoad]) -> None:
        self._heap = [(self.key(w), next(self._order), w) for w in loads.values() if w.healthy]
        heapq.heapify(self._heap)

    def changed(self, load: WorkerLoad, loads: Mapping[str, WorkerLoad]) -> None:
        """`load` is now its worker's entry in `loads`."""
        if load.healthy:
            heapq.heappush(self._heap, (self.key(load), next(self._order), load))
        if len(self._heap) > 2 * len(loads) + 64:  # mostly stale entries: start again
            self.rebuild(loads)

    def least(self, loads: Mapping[str, WorkerLoad]) -> Optional[WorkerLoad]:
        """The healthy load with the smallest key among `loads`, the book's current
        ones; None when none is healthy."""
        heap = self._heap
        while heap:
            load = heap[0][2]
            if loads.get(load.worker_id) is load:
                return load
            heapq.heappop(heap)  # replaced or forgotten since
        return None
