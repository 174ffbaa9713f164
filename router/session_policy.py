"""Session affinity: requests of one session go to one worker, where the conversation's
KV blocks are most likely still cached.

The map is per router replica (with several replicas a session is sticky within each);
it is bounded in size and in age, so it needs no cleanup from outside.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

from router.dispatch import Decision, DispatchPolicy, DispatchRequest, healthy_candidates
from router.load import WorkerLoad


class SessionAffinity:
    """Same session_id → same worker while that worker is a healthy candidate and the
    session was last seen less than ttl_s ago (each request refreshes it). Otherwise,
    and for requests without a session, the fallback policy chooses; a session then
    remembers the fallback's choice."""

    name = "session_affinity"

    def __init__(self, fallback: DispatchPolicy, clock: Callable[[], float], ttl_s: float = 600.0,
                 max_sessions: int = 100_000) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.fallback = fallback
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        # session id -> (worker id, last used). Invariant: ordered by last use, oldest
        # first, so expiry and the size bound pop from the front in O(1).
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision:
        sid = request.session_id
        if sid is None:
            return self._via_fallback(request, workers, "no session")
        now = self._clock()
        self._expire(now)
        candidates = healthy_candidates(request, workers)
        entry = self._sessions.get(sid)
        if entry is not None and any(w.worker_id == entry[0] for w in candidates):
            self._remember(sid, entry[0], now)
            return Decision(entry[0], self.name, reason=f"session {sid!r} sticks")
        why = "new session" if entry is None else f"session's worker {entry[0]} not healthy"
        decision = self._via_fallback(request, candidates, why)
        self._remember(sid, decision.worker_id, now)
        return decision

    def _via_fallback(self, request: DispatchRequest, workers: Sequence[WorkerLoad], why: str) -> Decision:
        d = self.fallback.choose(request, workers)
        return Decision(d.worker_id, self.name, d.predicted_hit_blocks,
                        f"{why}; {self.fallback.name}: {d.reason}")

    def _expire(self, now: float) -> None:
        while self._sessions:
            _, last_used = next(iter(self._sessions.values()))
            if now - last_used < self.ttl_s:
                break
            self._sessions.popitem(last=False)

    def _remember(self, sid: str, worker_id: str, now: float) -> None:
        self._sessions[sid] = (worker_id, now)
        self._sessions.move_to_end(sid)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
