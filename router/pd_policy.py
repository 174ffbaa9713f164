"""Where a request goes in a cluster with prefill and decode pools.

With healthy workers in both pools, a new request goes to the prefill worker that
would reach its first token soonest: the fewest prompt tokens to compute before and
for it, that is the worker's queued prefill tokens plus the part of this prompt not in
its prefix cache (least queued prefill tokens, prefix-aware). It names the decode
worker it moves to after its first token: the one with the most free KV per running
request. The decider
(`decider_max_uncached_tokens`, as llm-d's) skips the prefill hop for a prompt that a
decode worker can finish cheaply: one whose part not in that worker's prefix cache is
at most that many tokens goes straight there. Without both pools, any worker takes
the request whole: a pool that is down costs the split, not the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from router.load import WorkerLoad
from router.prefix_policy import leading_hits, prompt_block_hashes


@dataclass(frozen=True, slots=True)
class Route:
    candidates: list[WorkerLoad]  # where the dispatch policy may send the request
    handoff_to: Optional[str] = None  # the decode worker it moves to after its first token
    policy: Optional[str] = None  # set when this routing chose the worker itself (the metric's label)

    @property
    def direct(self) -> bool:
        """The decider sent it straight to a decode worker."""
        return self.policy == "decider"


def route(loads: Sequence[WorkerLoad], prompt_token_ids: Sequence[int], block_size: int,
          decider_max_uncached_tokens: int = 0) -> Route:
    prefill: list[WorkerLoad] = []
    decode: list[WorkerLoad] = []
    for w in loads:  # one pass: a router may see a thousand workers per request
        if not w.healthy:
            continue
        if w.role == "prefill":
            prefill.append(w)
        elif w.role == "decode":
            decode.append(w)
    if not (prefill and decode):
        return Route(list(loads))
    hashes = prompt_block_hashes(tuple(prompt_token_ids), block_size)
    if decider_max_uncached_tokens > 0:
        hits = {w.worker_id: leading_hits(hashes, w.cached_block_hashes) for w in decode}
        best = max(decode, key=lambda w: (hits[w.worker_id], w.freeness, -w.queue_length))
        if len(prompt_token_ids) - hits[best.worker_id] * block_size <= decider_max_uncached_tokens:
            return Route([best], policy="decider")

    def tokens_before_first(w: WorkerLoad) -> tuple[int, int, str]:
        uncached = len(prompt_token_ids) - leading_hits(hashes, w.cached_block_hashes) * block_size
        return (w.queued_prefill_tokens + uncached, w.queue_length, w.worker_id)

    first = min(prefill, key=tokens_before_first)
    return Route([first], max(decode, key=lambda w: (w.freeness, -w.queue_length)).worker_id, "prefill_tokens")
