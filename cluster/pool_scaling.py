"""Scaling the prefill and decode pools apart (plain Python; the clock is the caller's).

Each pool moves between its own min_workers and max_workers on its own signal, read
from the workers' load reports:

  prefill  the mean queued prefill tokens per worker (prompt tokens admitted and not
           yet computed): what a new request waits behind before its first token.
  decode   the mean freeness per worker (Llumnix's: decode steps of KV room per
           running request): what is left before decodes are preempted.

A worker is added when the signal has stayed past its `add` threshold for sustain_s,
and one is removed (drained first: its requests move or finish, nothing is lost)
when it has stayed past its `remove` threshold for idle_s. The thresholds sit well
before saturation, and a worker still starting counts as an idle one, so capacity is
started ahead of need and not twice for one burst. Two changes of one pool are at
least cooldown_s apart. The manager keeps each pool at the size decided so far,
replacing workers that die, as for fixed pools.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

if TYPE_CHECKING:
    from workers.load_report import LoadReport


@dataclass(frozen=True)
class PoolScaling:
    """One pool's bounds and thresholds; min_workers and max_workers default to the
    pool's num_workers (a fixed size)."""

    min_workers: Optional[int] = None
    max_workers: Optional[int] = None
    add_above_queued_tokens: float = 2048.0  # prefill pool
    remove_below_queued_tokens: float = 64.0
    add_below_freeness: float = 32.0  # decode pool
    remove_above_freeness: float = 1024.0
    sustain_s: float = 2.0
    idle_s: float = 60.0
    cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("min_workers", "max_workers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"scaling.{name} must be an integer >= 1, got {value!r}")
        if self.min_workers is not None and self.max_workers is not None and self.min_workers > self.max_workers:
            raise ValueError(f"scaling.min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers})")
        if not self.remove_below_queued_tokens < self.add_above_queued_tokens:
            raise ValueError(f"scaling.remove_below_queued_tokens ({self.remove_below_queued_tokens}) must be below "
                             f"add_above_queued_tokens ({self.add_above_queued_tokens})")
        if not self.add_below_freeness < self.remove_above_freeness:
            raise ValueError(f"scaling.add_below_freeness ({self.add_below_freeness}) must be below "
                             f"remove_above_freeness ({self.remove_above_freeness})")
        for name in ("sustain_s", "idle_s", "cooldown_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"scaling.{name} must be >= 0, got {getattr(self, name)!r}")

    def bounds(self, num_workers: int) -> tuple[int, int]:
        low = num_workers if self.min_workers is None else self.min_workers
        high = num_workers if self.max_workers is None else self.max_workers
        if not low <= num_workers <= high:
            raise ValueError(f"num_workers ({num_workers}) must lie within scaling.min_workers ({low}) and "
                             f"max_workers ({high})")
        return low, high

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PoolScaling":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown scaling settings {unknown}; known: {sorted(known)}")
        return cls(**raw)


@dataclass(frozen=True, slots=True)
class PoolWorker:
    """What the scaler sees of one worker of the pool."""

    worker_id: str
    booting: bool  # still starting: counts as idle capacity
    queued_prefill_tokens: int = 0
    freeness: float = 0.0
    num_requests: int = 0  # running and waiting: what draining it would have to move


def pool_worker(worker_id: str, load: Optional["LoadReport"]) -> PoolWorker:
    """A worker as its pool's scaler sees it; no load yet: still starting."""
    if load is None:
        return PoolWorker(worker_id, booting=True)
    return PoolWorker(worker_id, False, load.queued_prefill_tokens, load.freeness,
                      load.num_running + load.num_waiting)


@dataclass(frozen=True, slots=True)
class AddWorkers:
    role: str
    count: int
    why: str


@dataclass(frozen=True, slots=True)
class RemoveWorker:
    role: str
    worker_id: str
    why: str


Decision = Union[AddWorkers, RemoveWorker]


@dataclass(slots=True)
class _PoolState:
    hot_since: Optional[float] = None
    cold_since: Optional[float] = None
    changed_at: float = float("-inf")


class PoolScaler:
    def __init__(self, role: str, scaling: PoolScaling, num_workers: int, clock: Callable[[], float]) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"pools that scale are prefill and decode, got {role!r}")
        self.role = role
        self.scaling = scaling
        self.min_workers, self.max_workers = scaling.bounds(num_workers)
        self.clock = clock
        self._state = _PoolState()

    @property
    def scales(self) -> bool:
        return self.min_workers < self.max_workers

    def signal(self, workers: Sequence[PoolWorker]) -> float:
        """The pool's mean signal; a starting worker counts as an idle one."""
        if self.role == "prefill":
            values = [0.0 if w.booting else float(w.queued_prefill_tokens) for w in workers]
        else:
            values = [self.scaling.remove_above_freeness if w.booting else w.freeness for w in workers]
        return sum(values) / len(values)

    def decide(self, workers: Sequence[PoolWorker]) -> Optional[Decision]:
        """At most one change for the pool now. `workers`: its workers that are not
        draining."""
        now, s, state = self.clock(), self.scaling, self._state
        n = len(workers)
        if not n:
            return None  # the manager tops a pool up to its size on its own
        signal = self.signal(workers)
        hot = signal > s.add_above_queued_tokens if self.role == "prefill" else signal < s.add_below_freeness
        cold = (signal < s.remove_below_queued_tokens if self.role == "prefill"
                else signal > s.remove_above_freeness)
        state.hot_since = (state.hot_since if state.hot_since is not None else now) if hot else None
        state.cold_since = (state.cold_since if state.cold_since is not None else now) if cold else None
        if now - state.changed_at < s.cooldown_s:
            return None
        name = "queued prefill tokens per worker" if self.role == "prefill" else "freeness"
        if hot and n < self.max_workers and now - state.hot_since >= s.sustain_s:
            return self._changed(AddWorkers(self.role, 1, f"{name} {signal:.1f} for {now - state.hot_since:.1f} s"))
        ready = [w for w in workers if not w.booting]
        if cold and n > self.min_workers and ready and now - state.cold_since >= s.idle_s:
            victim = min(ready, key=lambda w: (w.num_requests, w.worker_id))
            return self._changed(RemoveWorker(self.role, victim.worker_id,
                                              f"{name} {signal:.1f} for {now - state.cold_since:.1f} s"))
        return None

    def _changed(self, decision: Decision) -> Decision:
        state = self._state
        state.changed_at = self.clock()
        state.hot_since = state.cold_since = None  # the new size is judged afresh
        return decision
