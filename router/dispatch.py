"""The dispatch interface: what a policy is asked (DispatchRequest), what it answers
(Decision), and the one failure it raises (NoWorkerAvailable).

Pure Python, shared by the policies in policies.py, prefix_policy.py and
session_policy.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

from router.load import WorkerLoad


class NoWorkerAvailable(RuntimeError):
    """No healthy worker among the candidates; the router answers 503/429."""


@dataclass(frozen=True, slots=True)
class DispatchRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    session_id: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_token_ids, tuple):
            raise ValueError(f"prompt_token_ids must be a tuple, got {type(self.prompt_token_ids).__name__}")


@dataclass(frozen=True, slots=True)
class Decision:
    worker_id: str
    policy: str  # the configured policy's name, for the decisions-by-policy metric
    # Leading prompt blocks the chosen worker is expected to hold (prefix_aware only), to
    # compare with the hit the worker realizes.
    predicted_hit_blocks: int = 0
    reason: str = ""


class DispatchPolicy(Protocol):
    name: str

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision: ...


@runtime_checkable
class LeastKeyPolicy(Protocol):
    """A policy that takes the healthy worker with the smallest key (least-load): a
    router's load book keeps its workers ordered by that key, so that the choice among a
    thousand workers costs a heap lookup, not a pass over them all."""

    name: str

    def key(self, w: WorkerLoad) -> Any: ...  # must end in worker_id: ties never depend on order

    def decision(self, chosen: WorkerLoad) -> Decision: ...

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision: ...


def healthy_candidates(request: DispatchRequest, workers: Sequence[WorkerLoad]) -> list[WorkerLoad]:
    """The healthy workers sorted by worker_id, so that no choice depends on the order
    of the snapshot; NoWorkerAvailable when there are none."""
    candidates = sorted((w for w in workers if w.healthy), key=lambda w: w.worker_id)
    if not candidates:
        raise no_healthy_worker(request, workers)
    return candidates


def least_healthy(request: DispatchRequest, workers: Sequence[WorkerLoad],
                  key: Callable[[WorkerLoad], Any]) -> WorkerLoad:
    """The healthy worker with the smallest key, in one pass (no sort: a router may
    see a thousand workers per request). The key must end in worker_id, so that the
    choice never depends on the snapshot's order; NoWorkerAvailable when none is healthy."""
    chosen = min((w for w in workers if w.healthy), key=key, default=None)
    if chosen is None:
        raise no_healthy_worker(request, workers)
    return chosen


def no_healthy_worker(request: DispatchRequest, workers: Sequence[WorkerLoad]) -> NoWorkerAvailable:
    return NoWorkerAvailable(f"no healthy worker for request {request.request_id!r} "
                             f"({len(workers)} candidates, none healthy)")
