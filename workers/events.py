"""What crosses the router → worker boundary: the request, and the typed events a
worker streams back for it.

Token indexes are absolute positions in the request's output. A router forwards
each index once and drops any it has already sent; after `Moved` it asks the next
worker to resume at `next_index`. That one rule makes migration, prefill→decode
handoff and failure recovery invisible to the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from workers.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0
    arrival_time: Optional[float] = None
    session_id: Optional[str] = None
    # Resuming elsewhere (after a worker died): the output already sent to the
    # client. The worker recomputes prompt + these and continues from their end.
    resume_token_ids: tuple[int, ...] = ()
    # Prefill/decode disaggregation: sent to a prefill worker, the request moves with
    # its KV to this decode worker once its first token is out (workers/worker.py).
    handoff_to: Optional[str] = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class Tokens:
    request_id: str
    start_index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: Optional[tuple[TokenLogprob, ...]] = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    request_id: str
    reason: str  # "stop", "length" or "abort"
    stop_reason: Union[int, str, None]
    usage: Usage


@dataclass(frozen=True, slots=True)
class Moved:
    request_id: str
    to_worker: str
    next_index: int


@dataclass(frozen=True, slots=True)
class Failed:
    request_id: str
    code: str  # "invalid_request", "worker_unhealthy", "draining", "internal"
    message: str


Event = Union[Tokens, Finished, Moved, Failed]


# The Ray namespace of the cluster manager and its workers (router/config.py names it
# MANAGER_NAMESPACE): a worker finds another by name here.
ACTOR_NAMESPACE = "yard"


def worker_actor_name(worker_id: str) -> str:
    """The Ray actor name of a worker (in the cluster manager's namespace): how a
    router finds a worker that a request moved to before its snapshot knows it."""
    return f"yard-{worker_id}"
