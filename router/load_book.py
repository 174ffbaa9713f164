"""A router's view of the workers' loads: the last snapshot, corrected by what this
router sent and saw end since, and the choice of a worker made from it.

Pure Python (no torch, no ray): the router replica (router/core.py) and the
simulator (cluster/sim/) keep the same book and choose through the same function,
so that the simulator dispatches as the cluster does.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from router.dispatch import DispatchPolicy, DispatchRequest, LeastKeyPolicy, no_healthy_worker
from router.least_index import LeastIndex
from router.load import WorkerLoad
from router.pd_policy import route


class LoadBook:
    """Per worker, the snapshot's load and this router's requests sent there and ended
    there since the worker's last report: the snapshot lags, these do not."""

    def __init__(self) -> None:
        self.loads: dict[str, WorkerLoad] = {}
        self.sent: collections.Counter[str] = collections.Counter()
        self.ended: collections.Counter[str] = collections.Counter()
        self.sent_tokens: collections.Counter[str] = collections.Counter()  # their prompt tokens
        # The corrected loads, kept up to date worker by worker: a dispatch changes one
        # worker's, so a router of many workers does not rebuild them all per request.
        self._current: dict[str, WorkerLoad] = {}
        self._split = False  # healthy workers in both the prefill and the decode pool
        self._index: Optional[LeastIndex] = None  # built at the first place() with a least-key policy
        self._indexed: Optional[DispatchPolicy] = None

    def refresh(self, loads: dict[str, WorkerLoad]) -> None:
        """A new snapshot: a worker's fresh report already counts what was sent to it."""
        current = {}
        for wid, load in loads.items():
            old = self.loads.get(wid)
            if old is None or load.reported_at > old.reported_at:
                self.sent[wid] = self.ended[wid] = self.sent_tokens[wid] = 0
            elif load is old and wid in self._current:
                current[wid] = self._current[wid]  # the same report, the same counts since
                continue
            current[wid] = adjusted(load, self.sent[wid] - self.ended[wid], self.sent_tokens[wid])
        self.loads = loads
        self._current = current
        self._split = self._pools_split()
        if self._index is not None:
            self._index.rebuild(current)

    def dispatched(self, worker_id: str, prompt_tokens: int = 0) -> None:
        self.sent[worker_id] += 1
        self.sent_tokens[worker_id] += prompt_tokens
        self._update(worker_id)

    def finished(self, worker_id: str) -> None:
        self.ended[worker_id] += 1
        self._update(worker_id)

    def forget(self, worker_id: str) -> None:
        self.loads.pop(worker_id, None)
        self._current.pop(worker_id, None)
        self._split = self._pools_split()

    def saturated(self, max_queue_per_worker: int) -> bool:
        """Every healthy worker's queue is at the limit: new requests are shed (429)."""
        any_healthy = False
        for w in self._current.values():  # stops at the first worker with room: most often the first
            if w.healthy:
                if w.queue_length < max_queue_per_worker:
                    return False
                any_healthy = True
        return any_healthy

    def current(self) -> list[WorkerLoad]:
        """The snapshot corrected by what this router sent and saw end since: sent
        requests count as waiting there and share its free KV slots, so a burst
        spreads out; ended ones no longer count, so a stale report of a full queue
        does not shed load that the worker could already take."""
        return list(self._current.values())

    def place(self, request: DispatchRequest, policy: DispatchPolicy, block_size: int,
              decider_max_uncached_tokens: int = 0, prefer: Optional[str] = None,
              excluded: frozenset[str] = frozenset()) -> Placement:
        """place() below, over the current loads less `excluded`. Without a P/D split, a
        least-key policy's choice is read from the index: the same worker, without a
        pass over every worker."""
        if excluded or self._split or self._least_index(policy) is None:
            loads = [w for w in self._current.values() if w.worker_id not in excluded]
            return place(request, loads, policy, block_size, decider_max_uncached_tokens, prefer)
        preferred = self._current.get(prefer) if prefer is not None else None
        if preferred is not None and preferred.healthy:
            return Placement(preferred.worker_id, "same_prompt")
        assert self._index is not None
        chosen = self._index.least(self._current)
        if chosen is None:
            raise no_healthy_worker(request, list(self._current.values()))
        decision = policy.decision(chosen)  # type: ignore[attr-defined]  (a LeastKeyPolicy)
        return Placement(decision.worker_id, decision.policy, decision.predicted_hit_blocks)

    def _least_index(self, policy: DispatchPolicy) -> Optional[LeastIndex]:
        if policy is not self._indexed:
            self._indexed = policy
            self._index = LeastIndex(policy.key, self._current) if isinstance(policy, LeastKeyPolicy) else None
        return self._index

    def _pools_split(self) -> bool:
        roles = {w.role for w in self._current.values() if w.healthy}
        return "prefill" in roles and "decode" in roles

    def _update(self, worker_id: str) -> None:
        if worker_id in self.loads:
            load = self._current[worker_id] = self._corrected(worker_id)
            if self._index is not None:
                self._index.changed(load, self._current)

    def _corrected(self, worker_id: str) -> WorkerLoad:
        return adjusted(self.loads[worker_id], self.sent[worker_id] - self.ended[worker_id],
                        self.sent_tokens[worker_id])


def adjusted(load: WorkerLoad, change: int, sent_tokens: int = 0) -> WorkerLoad:
    """`load` with `change` more requests (fewer, if negative): added ones wait,
    removed ones leave the waiting queue first, then the running batch. The prompt
    tokens sent since the report count as queued for prefill (some may be computed
    by now; the next report says)."""
    changes: dict[str, Any] = {}
    if sent_tokens:
        changes["queued_prefill_tokens"] = load.queued_prefill_tokens + sent_tokens
    if change > 0:
        sharing = max(load.num_running, 1)
        changes["num_waiting"] = load.num_waiting + change
        changes["freeness"] = load.freeness * sharing / (load.num_running + change)
    elif change < 0:
        gone = -change
        from_waiting = min(gone, load.num_waiting)
        changes["num_waiting"] = load.num_waiting - from_waiting
        changes["num_running"] = max(0, load.num_running - (gone - from_waiting))
    return dataclasses.replace(load, **changes) if changes else load


@dataclass(frozen=True, slots=True)
class Placement:
    worker_id: str
    policy: str  # the metric's label: the policy, or "decider", "prefill_tokens", "same_prompt"
    predicted_hit_blocks: int = 0
    handoff_to: Optional[str] = None  # the decode worker a prefill worker hands the request to


def place(request: DispatchRequest, loads: Sequence[WorkerLoad], policy: DispatchPolicy, block_size: int,
          decider_max_uncached_tokens: int = 0, prefer: Optional[str] = None) -> Placement:
    """Where a request goes: the prefill/decode split first (router/pd_policy.py),
    then the dispatch policy among the candidates it leaves, unless `prefer` (a
    request's earlier choice) is one of them and healthy. Raises NoWorkerAvailable."""
    where = route(loads, request.prompt_token_ids, block_size, decider_max_uncached_tokens)
    if prefer is not None and any(w.worker_id == prefer and w.healthy for w in where.candidates):
        return Placement(prefer, "same_prompt", 0, where.handoff_to)
    decision = policy.choose(request, where.candidates)
    return Placement(decision.worker_id, where.policy or decision.policy, decision.predicted_hit_blocks,
                     where.handoff_to)
