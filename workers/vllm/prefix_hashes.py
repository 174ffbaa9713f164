"""The prefix blocks a vLLM engine holds, named as yard's routers name them.

The `prefix_aware` dispatch policy (router/prefix_policy.py) hashes a prompt with
yard's chain_hash, `unit` tokens to a block, and matches those hashes against each
worker's reported `cached_block_hashes`. vLLM hashes its blocks its own way (and on
CPU its blocks are larger). So for every full block that vLLM hashes, this keeps the
yard hashes of the yard-sized blocks that end inside it, keyed by vLLM's hash; a
report then names the yard blocks whose vLLM block is still in vLLM's prefix cache.

A yard block counts as cached once every token of it is in a cached vLLM block, so
the router may count up to one vLLM block's worth of tokens that vLLM then computes
after all (its hit is in whole vLLM blocks): the ranking of workers stays right.

Plain Python: the engine hands in vLLM's requests and a cache probe.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Sequence

from workers.engine.block_manager import chain_hash


class HashedRequest(Protocol):
    """What this reads of a vLLM request (vllm.v1.request.Request)."""

    request_id: str
    block_hashes: Sequence[bytes]  # one per full block of its tokens, chained
    all_token_ids: Sequence[int]


@dataclass(slots=True)
class _Progress:
    vllm_blocks: int = 0  # vLLM blocks of the request mapped so far
    yard_blocks: int = 0
    parent: Optional[int] = None  # yard hash of its last mapped yard block


class CachedPrefixes:
    """vLLM block hash → the yard hashes of the `unit`-token blocks ending in it."""

    def __init__(self, unit: int, vllm_block_size: int, max_blocks: int) -> None:
        if unit < 1 or vllm_block_size < 1 or max_blocks < 1:
            raise ValueError(f"unit ({unit}), vllm_block_size ({vllm_block_size}) and max_blocks ({max_blocks}) "
                             f"must be >= 1")
        self.unit = unit
        self.vllm_block_size = vllm_block_size
        self.max_blocks = max_blocks  # vLLM blocks remembered; the oldest go first
        self._yard_of: collections.OrderedDict[bytes, tuple[int, ...]] = collections.OrderedDict()
        self._progress: dict[str, _Progress] = {}

    def update(self, requests: Iterable[HashedRequest]) -> None:
        """Map the vLLM blocks the requests filled since the last call; forget the
        progress of requests no longer among them."""
        seen = set()
        for request in requests:
            seen.add(request.request_id)
            progress = self._progress.setdefault(request.request_id, _Progress())
            while progress.vllm_blocks < len(request.block_hashes):
                self._map_block(request, progress)
        for gone in self._progress.keys() - seen:
            del self._progress[gone]

    def _map_block(self, request: HashedRequest, progress: _Progress) -> None:
        end = (progress.vllm_blocks + 1) * self.vllm_block_size
        tokens = request.all_token_ids
        yard = []
        while (progress.yard_blocks + 1) * self.unit <= end:
            start = progress.yard_blocks * self.unit
            progress.parent = chain_hash(progress.parent, tuple(tokens[start:start + self.unit]))
            yard.append(progress.parent)
            progress.yard_blocks += 1
        key = request.block_hashes[progress.vllm_blocks]
        self._yard_of[key] = tuple(yard)
        self._yard_of.move_to_end(key)  # a prefix hit refreshes it
        while len(self._yard_of) > self.max_blocks:
            self._yard_of.popitem(last=False)
        progress.vllm_blocks += 1

    def cached(self, is_cached: Callable[[bytes], bool], max_hashes: int) -> frozenset[int]:
        """The yard hashes of blocks vLLM still caches (is_cached: by vLLM's hash),
        newest first, at most max_hashes."""
        found: list[int] = []
        for key in reversed(self._yard_of):
            if len(found) >= max_hashes:
                break
            if is_cached(key):
                found.extend(self._yard_of[key])
        return frozenset(found[:max_hashes])
