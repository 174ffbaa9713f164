"""Block manager: exact block ids, reference counts, prefix hits and LRU eviction."""

from __future__ import annotations

from workers.engine.block_manager import BlockManager, chain_hash
from workers.engine.sequence import Sequence
from workers.sampling_params import SamplingParams


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(), max_tokens=16)


def compute_all(bm: BlockManager, s: Sequence) -> None:
    hits = bm.lookup_prefix(s)
    bm.admit(s, hits, s.num_tokens - len(hits) * bm.block_size)
    s.num_computed_tokens = s.num_tokens
    bm.commit_computed(s)


def test_allocation_takes_lowest_free_ids_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", range(10))
    compute_all(bm, a)
    assert a.block_ids == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert bm.ref_counts[:4] == [1, 1, 1, 0]


def test_prefix_hit_shares_blocks_and_leaves_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", range(10))
    compute_all(bm, a)
    b = seq("b", list(range(8)) + [99, 98])
    assert bm.lookup_prefix(b) == [0, 1]
    # Exactly two full blocks of prompt: the second is not a hit, one token must remain.
    c = seq("c", range(8))
    assert bm.lookup_prefix(c) == [0]
    compute_all(bm, b)
    assert b.block_ids == [0, 1, 3]
    assert b.num_cached_tokens == 8
    assert bm.ref_counts[:4] == [2, 2, 1, 1]


def test_hash_chain_and_token_check():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq("a", [1, 2, 3, 4, 5])
    compute_all(bm, a)
    assert a.block_hashes == [hash(((1, 2),)), hash((hash(((1, 2),)), (3, 4)))]
    # Same second block, different first: the chained hash differs, no hit past block 0.
    assert bm.lookup_prefix(seq("b", [1, 9, 3, 4, 5])) == []
    # A forged hash collision is caught by the token check.
    bm.cached[chain_hash(None, (7, 7))] = bm.cached[chain_hash(None, (1, 2))]
    assert bm.lookup_prefix(seq("c", [7, 7, 3])) == []


def test_freed_cached_blocks_are_reused_then_evicted_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq("a", [1, 2, 3, 4, 5, 6, 7])  # blocks 0,1,2 full and cached; block 3 partial
    compute_all(bm, a)
    assert a.block_ids == [0, 1, 2, 3]
    bm.free(a)
    assert bm.num_free_blocks == 4
    # The uncached partial block goes first, then the tail of the chain before its head.
    assert list(bm.free_queue) == [3, 2, 1, 0]
    b = seq("b", [1, 2, 3, 4, 9])
    assert bm.lookup_prefix(b) == [0, 1]
    compute_all(bm, b)
    assert b.block_ids == [0, 1, 3]
    assert list(bm.free_queue) == [2]
    # Taking block 2 for new data evicts its cached content.
    c = seq("c", [8, 8])
    compute_all(bm, c)
    assert c.block_ids == [2]
    assert chain_hash(chain_hash(chain_hash(None, (1, 2)), (3, 4)), (5, 6)) not in bm.cached


def test_admission_counts_revived_hits_and_watermark():
    bm = BlockManager(num_blocks=4, block_size=2, watermark_blocks=1)
    a = seq("a", [1, 2, 3, 4, 5])
    compute_all(bm, a)
    bm.free(a)
    b = seq("b", [1, 2, 3, 4, 6, 7, 8])
    hits = bm.lookup_prefix(b)
    assert hits == [0, 1]
    # needs 2 new blocks + 2 revived = 4 > 4 free - 1 watermark
    assert not bm.can_admit(b, hits, 3)
    assert bm.can_admit(b, hits, 1)


def test_reserve_and_release_round_trip():
    bm = BlockManager(num_blocks=6, block_size=4)
    blocks = bm.reserve(4)
    assert blocks == [0, 1, 2, 3]
    bm.release(reversed(blocks))
    assert bm.num_free_blocks == 6
    assert bm.ref_counts == [0] * 6


def leading_reported(bm: BlockManager, s: Sequence, limit: int) -> int:
    """How many of s's leading blocks a router would count as cached (router/prefix_policy.py)."""
    reported = set(bm.cached_block_hashes(limit))
    bm.hash_full_blocks(s)
    n = 0
    while n < len(s.block_hashes) and s.block_hashes[n] in reported:
        n += 1
    return n


def test_reported_hashes_keep_whole_chains_in_lru_order():
    bm = BlockManager(num_blocks=64, block_size=2)
    system = [1, 2, 3, 4]  # a shared prefix: two blocks, cached first
    first = seq("first", system + [10, 11, 12])
    compute_all(bm, first)
    bm.free(first)
    for i in range(8):  # then many unrelated prompts, each of two full blocks
        s = seq(f"other-{i}", [100 + 4 * i, 101 + 4 * i, 102 + 4 * i, 103 + 4 * i, 7])
        compute_all(bm, s)
        bm.free(s)
    late = seq("late", system + [20, 21, 22])
    assert leading_reported(bm, late, limit=6) == 0  # the shared head is the least recently used
    compute_all(bm, late)  # a hit on the system prompt: it is the most recently used now
    bm.free(late)
    reported = bm.cached_block_hashes(limit=6)
    assert len(reported) == 5  # late's chain (3), other-7's (2); other-6's would not fit whole
    assert leading_reported(bm, seq("next", system + [30, 31, 32]), limit=6) == 2
    assert leading_reported(bm, seq("again", system + [20, 21, 22]), limit=6) == 3
    # Every reported block comes with its ancestors.
    parents = {h: bm.block_content[bm.cached[h]][1][0] for h in reported}
    assert all(p is None or p in reported for p in parents.values())


def test_a_block_whose_ancestor_was_evicted_is_not_reported():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq("a", [1, 2, 3, 4, 5, 6, 9])  # three full blocks, 0 1 2, then a partial one
    compute_all(bm, a)
    b = seq("b", [40, 41, 9])
    compute_all(bm, b)
    bm.free(a)
    bm.free_queue.move_to_end(0, last=False)  # make a's head the next block handed out
    bm.reserve(1)  # ...which evicts it: a's other blocks can never be hit again
    assert bm.cached_block_hashes(limit=10) == [chain_hash(None, (40, 41))]
