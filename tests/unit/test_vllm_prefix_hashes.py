"""vLLM's cached blocks named by yard's hashes: what the prefix_aware router reads of a
vLLM worker. The router's own hashing (router/prefix_policy.py) is the reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from router.prefix_policy import leading_hits, prompt_block_hashes
from workers.vllm.prefix_hashes import CachedPrefixes

VLLM_BLOCK = 64
UNIT = 16


@dataclass
class FakeRequest:
    """A vLLM request as the index reads it: its hashes stand in for vLLM's (any bytes
    unique per chained block do)."""

    request_id: str
    all_token_ids: list[int]
    block_hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rehash()

    def rehash(self) -> None:
        full = len(self.all_token_ids) // VLLM_BLOCK
        self.block_hashes = [repr(self.all_token_ids[:(i + 1) * VLLM_BLOCK]).encode() for i in range(full)]


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 1000 for i in range(n)]


def test_the_router_counts_exactly_the_tokens_of_vllms_cached_blocks() -> None:
    request = FakeRequest("a", tokens(1, 200))  # 3 full vLLM blocks: 192 tokens, 12 router blocks
    index = CachedPrefixes(UNIT, VLLM_BLOCK, 100)
    index.update([request])
    everything = index.cached(lambda h: True, 1000)
    hashes = prompt_block_hashes(tuple(request.all_token_ids) + (1,), UNIT)
    assert leading_hits(hashes, everything) == 12 and len(everything) == 12
    # vLLM evicted its second block: the router's hit stops before it.
    second = request.block_hashes[1]
    assert leading_hits(hashes, index.cached(lambda h: h != second, 1000)) == 4


def test_output_blocks_are_mapped_as_they_fill_and_a_gone_request_is_forgotten() -> None:
    request = FakeRequest("a", tokens(2, 60))
    index = CachedPrefixes(UNIT, VLLM_BLOCK, 100)
    index.update([request])
    assert index.cached(lambda h: True, 1000) == frozenset()  # no full vLLM block yet
    request.all_token_ids += tokens(3, 80)  # decoded on: 140 tokens, 2 full blocks
    request.rehash()
    index.update([request])
    hashes = prompt_block_hashes(tuple(request.all_token_ids) + (1,), UNIT)
    assert leading_hits(hashes, index.cached(lambda h: True, 1000)) == 8
    index.update([])
    assert not index._progress  # its blocks stay named; its progress goes


def test_a_block_size_that_does_not_divide_vllms() -> None:
    """unit 48 against vLLM's 64: a yard block counts once all its tokens are cached."""
    request = FakeRequest("a", tokens(4, 200))
    index = CachedPrefixes(48, VLLM_BLOCK, 100)
    index.update([request])
    hashes = prompt_block_hashes(tuple(request.all_token_ids) + (1,), 48)
    assert leading_hits(hashes, index.cached(lambda h: True, 1000)) == 4  # 192 cached tokens: 4 × 48
    first = request.block_hashes[0]
    assert leading_hits(hashes, index.cached(lambda h: h != first, 1000)) == 0


def test_newest_blocks_first_within_the_bounds() -> None:
    old, new = FakeRequest("old", tokens(5, 128)), FakeRequest("new", tokens(6, 128))
    index = CachedPrefixes(UNIT, VLLM_BLOCK, 3)  # remembers 3 vLLM blocks of the 4
    index.update([old])
    index.update([new])
    new_hashes = prompt_block_hashes(tuple(new.all_token_ids) + (1,), UNIT)
    assert index.cached(lambda h: True, 8) == frozenset(new_hashes[:8])
    everything = index.cached(lambda h: True, 1000)
    assert len(everything) == 12 and frozenset(new_hashes) <= everything
    old_hashes = prompt_block_hashes(tuple(old.all_token_ids) + (1,), UNIT)
    assert leading_hits(old_hashes, everything) == 0  # its first block was forgotten


def test_bad_sizes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unit \(0\)"):
        CachedPrefixes(0, VLLM_BLOCK, 10)
