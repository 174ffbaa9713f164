"""Prefix-cache-aware dispatch: send a request where its prompt's leading KV blocks are
already cached, unless that worker is much busier than the least-loaded one.

The router hashes the prompt exactly as the engine's block manager does (chain_hash,
pure Python), and matches the hashes against each worker's reported cached hashes.
"""

from __future__ import annotations

from typing import AbstractSet, Sequence

from router.dispatch import Decision, DispatchRequest, healthy_candidates
from router.load import WorkerLoad
from workers.engine.block_manager import chain_hash


def prompt_block_hashes(token_ids: tuple[int, ...], block_size: int) -> list[int]:
    """Chained hashes of the prompt's blocks that the engine could take from its cache.
    Like BlockManager.lookup_prefix, at most (len - 1) // block_size blocks: the engine
    always computes the last prompt token itself, because that step samples."""
    hashes: list[int] = []
    parent = None
    for i in range((len(token_ids) - 1) // block_size):
        parent = chain_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def leading_hits(hashes: Sequence[int], cached: AbstractSet[int]) -> int:
    """How many of the hashes, from the first, are cached. Stops at the first miss: a
    block's KV is only reusable after its whole prefix."""
    hits = 0
    for h in hashes:
        if h not in cached:
            break
        hits += 1
    return hits


class PrefixAware:
    """The worker holding the longest cached prefix of the prompt, among the workers
    whose queue (running + waiting) is within imbalance_guard of the shortest queue.

    When the worker with the most hits is busier than that, the guard overrides it and
    the request goes to the best of the rest; with no hits anywhere that is the least
    loaded (shortest queue, then highest freeness, then worker_id).
    """

    name = "prefix_aware"

    def __init__(self, block_size: int, imbalance_guard: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if imbalance_guard < 0:
            raise ValueError(f"imbalance_guard must be >= 0, got {imbalance_guard}")
        self.block_size = block_size
        self.imbalance_guard = imbalance_guard

    def choose(self, request: DispatchRequest, workers: Sequence[WorkerLoad]) -> Decision:
        candidates = healthy_candidates(request, workers)
        hashes = prompt_block_hashes(request.prompt_token_ids, self.block_size)
        hits = {w.worker_id: leading_hits(hashes, w.cached_block_hashes) for w in candidates}

        def rank(w: WorkerLoad) -> tuple[int, int, float, str]:
            return (-hits[w.worker_id], w.queue_length, -w.freeness, w.worker_id)

        best = min(candidates, key=rank)
        shortest = min(w.queue_length for w in candidates)
        within = [w for w in candidates if w.queue_length - shortest <= self.imbalance_guard]
        chosen = min(within, key=rank)
        if chosen is best:
            reason = f"{hits[chosen.worker_id]} of {len(hashes)} blocks cached"
        else:
            reason = (f"guard: {best.worker_id} holds {hits[best.worker_id]} blocks but its queue "
                      f"{best.queue_length} exceeds the shortest {shortest} by more than "
                      f"{self.imbalance_guard}; {hits[chosen.worker_id]} of {len(hashes)} blocks cached")
        return Decision(chosen.worker_id, self.name, hits[chosen.worker_id], reason)
