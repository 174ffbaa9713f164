"""Dispatch policies: which worker gets a request, from the workers' load reports.

Pure Python (no torch, no ray) so they are tested in milliseconds. Every policy takes
its randomness and clock as constructor arguments and keeps its state on the instance:
two routers in one process share nothing. The interface is in dispatch.py (re-exported
here); prefix_aware and session_affinity live in prefix_policy.py and session_policy.py.

The caller passes the workers that may take the request (role already filtered);
policies consider only the healthy ones and raise NoWorkerAvailable when none is left.
Ties are broken by worker_id so that a choice never depends on the snapshot's order.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Optional, Sequence

from router.dispatch import (Decision, DispatchPolicy, DispatchRequest, NoWorkerAvailable, healthy_candidates,
                             least_healthy)
from router.load import WorkerLoad
from router.prefix_policy import PrefixAware
from router.session_policy import SessionAffinity

__all__ = ["Decision", "DispatchPolicy", "DispatchRequest", "Flood", "LeastLoad", "NoWorkerAvailable",
           "PowerOfTwoChoices", "PrefixAware", "RoundRobin", "SessionAffinity", "make_policy"]


class RoundRobin:
    """Each request to the worker after the previous one, in worker_id order. Keyed on
    the last worker_id rather than a counter so that workers joining or leaving do not
    make it skip or repeat the others."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: Optional[str] = None

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision:
        candidates = healthy_candidates(request, workers)
        after = [w for w in candidates if self._last is not None and w.worker_id > self._last]
        chosen = (after or candidates)[0]
        self._last = chosen.worker_id
        return Decision(chosen.worker_id, self.name, reason="next in turn")


def _queue_key(w: WorkerLoad) -> tuple[int, int, str]:
    # Lighter first: fewer requests, then more free blocks, then worker_id.
    return (w.queue_length, -w.free_blocks, w.worker_id)


class PowerOfTwoChoices:
    """Sample two distinct workers, take the lighter. Unlike picking the global minimum,
    router replicas acting on the same stale snapshot do not all pile onto one worker."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision:
        candidates = healthy_candidates(request, workers)
        if len(candidates) == 1:
            return Decision(candidates[0].worker_id, self.name, reason="only healthy worker")
        a, b = self._rng.sample(candidates, 2)
        chosen, other = sorted((a, b), key=_queue_key)
        return Decision(chosen.worker_id, self.name,
                        reason=f"lighter than {other.worker_id} "
                               f"(queue {chosen.queue_length} vs {other.queue_length})")


class LeastLoad:
    """The worker with the highest freeness (most decode steps left). A LeastKeyPolicy:
    the load book (router/load_book.py) keeps the workers ordered by its key."""

    name = "least_load"

    @staticmethod
    def key(w: WorkerLoad) -> tuple[float, str]:
        return (-w.freeness, w.worker_id)

    def decision(self, chosen: WorkerLoad) -> Decision:
        return Decision(chosen.worker_id, self.name, reason=f"highest freeness {chosen.freeness:g}")

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision:
        return self.decision(least_healthy(request, workers, self.key))


class Flood:
    """Every request to one worker: `target` while it is healthy, else the healthy worker
    with the smallest worker_id. It overloads one worker on purpose, so that tests and
    benchmarks can watch migration move requests off it (as Llumnix's tests do)."""

    name = "flood"

    def __init__(self, target: Optional[str] = None) -> None:
        if target is not None and (not isinstance(target, str) or not target):
            raise ValueError(f"target must be a non-empty worker id, got {target!r}")
        self.target = target

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision:
        candidates = healthy_candidates(request, workers)
        if self.target is not None:
            if any(w.worker_id == self.target for w in candidates):
                return Decision(self.target, self.name, reason="target")
            return Decision(candidates[0].worker_id, self.name,
                            reason=f"target {self.target} not healthy; smallest worker_id")
        return Decision(candidates[0].worker_id, self.name, reason="smallest worker_id")


# Options each policy accepts besides the injected rng and clock, which every policy
# accepts (a generic caller always passes both) and uses only if it needs them.
_OPTIONS: dict[str, frozenset[str]] = {
    "round_robin": frozenset(),
    "power_of_two": frozenset(),
    "least_load": frozenset(),
    "flood": frozenset({"target"}),
    "prefix_aware": frozenset({"block_size", "imbalance_guard"}),
    "session_affinity": frozenset({"fallback", "ttl_s", "max_sessions"}),
}


def make_policy(name: str, *, rng: Optional[random.Random] = None,
                clock: Optional[Callable[[], float]] = None, **options: Any) -> DispatchPolicy:
    """Build a policy from config. rng defaults to a fresh, OS-seeded random.Random and
    clock to time.monotonic; tests inject both. session_affinity takes `fallback` (a
    policy name, default least_load) and passes the fallback's own options through."""
    rng = rng if rng is not None else random.Random()
    clock = clock if clock is not None else time.monotonic
    _check_options(name, options)
    if name == "session_affinity":
        own = {k: options.pop(k) for k in ("ttl_s", "max_sessions") if k in options}
        fallback = make_policy(options.pop("fallback", "least_load"), rng=rng, clock=clock, **options)
        return SessionAffinity(fallback, clock=clock, **own)
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return PowerOfTwoChoices(rng)
    if name == "least_load":
        return LeastLoad()
    if name == "flood":
        return Flood(options.get("target"))
    assert name == "prefix_aware", name  # _check_options knows every name
    missing = sorted({"block_size", "imbalance_guard"} - set(options))
    if missing:
        raise ValueError(f"dispatch policy 'prefix_aware' needs option(s) {missing}")
    return PrefixAware(options["block_size"], options["imbalance_guard"])


def _check_options(name: str, options: dict[str, Any]) -> None:
    if name not in _OPTIONS:
        raise ValueError(f"unknown dispatch policy {name!r}; known: {sorted(_OPTIONS)}")
    allowed = _OPTIONS[name]
    if name == "session_affinity":
        fallback = options.get("fallback", "least_load")
        if fallback not in _OPTIONS or fallback == "session_affinity":
            known = sorted(set(_OPTIONS) - {"session_affinity"})
            raise ValueError(f"unknown fallback policy {fallback!r} for session_affinity; known: {known}")
        allowed = allowed | _OPTIONS[fallback]  # the fallback's options ride along
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dispatch policy {name!r}; accepted: {sorted(allowed)}")
