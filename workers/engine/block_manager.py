"""Paged KV-cache bookkeeping: block reference counts and automatic prefix caching.

Pure Python: it decides which block ids hold which tokens; the model runner owns the
tensors. A full block whose KV has been computed is registered under a chained hash of
its tokens (the parent block's hash and its own tokens), so a later request with the
same prefix reuses it. Free blocks wait in an LRU queue; a free block that still holds
cached content stays findable until it is taken for new data (then it is evicted).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

from workers.engine.sequence import Sequence


def chain_hash(parent: Optional[int], tokens: tuple[int, ...]) -> int:
    """Hash of a full block given its parent's hash. Python's hash of int tuples does
    not depend on PYTHONHASHSEED, so routers in other processes compute the same
    value; None is never hashed, because before Python 3.12 its hash is its address."""
    return hash((tokens,)) if parent is None else hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 watermark_blocks: int = 0) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Admission keeps this many blocks spare so running requests can grow a little.
        self.watermark_blocks = watermark_blocks
        self.ref_counts = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: OrderedDict[int, int] = OrderedDict()  # block hash -> block id, least recently used first
        # block id -> (its hash, (parent hash, tokens)) for the token check on every hit
        self.block_content: dict[int, tuple[int, tuple[Optional[int], tuple[int, ...]]]] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------
    def hash_full_blocks(self, seq: Sequence) -> None:
        """Extend seq.block_hashes to every full block of its known tokens."""
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(chain_hash(parent, tuple(tokens[i * bs:(i + 1) * bs])))

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks. At least one token is left
        uncomputed, because the step that computes it is the one that samples."""
        if not self.enable_prefix_caching:
            return []
        self.hash_full_blocks(seq)
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(seq.block_hashes[i])
            if block is None or not self._content_matches(block, seq, i):
                break
            hits.append(block)
        return hits

    def _content_matches(self, block: int, seq: Sequence, index: int) -> bool:
        _, (parent, tokens) = self.block_content[block]
        bs = self.block_size
        expected_parent = seq.block_hashes[index - 1] if index else None
        return parent == expected_parent and tokens == tuple(seq.token_ids[index * bs:(index + 1) * bs])

    def commit_computed(self, seq: Sequence) -> None:
        """Register seq's newly computed full blocks so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        self.hash_full_blocks(seq)
        bs, cached, content = self.block_size, self.cached, self.block_content
        block_ids, hashes, tokens = seq.block_ids, seq.block_hashes, seq.token_ids
        for i in range(seq.num_hashed_blocks, full):
            block, h = block_ids[i], hashes[i]
            if h in cached or block in content:
                continue  # the same content is cached in another block already
            cached[h] = block
            content[block] = (h, (hashes[i - 1] if i else None, tuple(tokens[i * bs:(i + 1) * bs])))
        seq.num_hashed_blocks = full

    def cached_block_hashes(self, limit: int) -> list[int]:
        """At most `limit` cached block hashes for load reports, the most recently used
        chains first, each with all its ancestors. A router counts a prompt's leading
        blocks that are cached, so a block is worth reporting only with the blocks
        before it: the heads of chains (a system prompt everyone shares) above all.
        A block whose ancestor was evicted can never be hit, and is left out."""
        if limit < 1:
            return []
        reported: dict[int, None] = {}
        orphans: set[int] = set()
        for newest in reversed(self.cached):
            chain = self._unreported_chain(newest, reported, orphans)
            if len(reported) + len(chain) > limit:
                break  # the rest is older: what is reported stays a set of whole chains
            reported.update(dict.fromkeys(reversed(chain)))
        return list(reported)

    def _unreported_chain(self, block_hash: int, reported: dict[int, None], orphans: set[int]) -> list[int]:
        """block_hash and its ancestors not yet reported, newest first; empty if an
        ancestor is no longer cached (then they all join `orphans`)."""
        chain: list[int] = []
        h: Optional[int] = block_hash
        while h is not None and h not in reported:
            block = self.cached.get(h)
            if block is None or h in orphans:
                orphans.update(chain)
                return []
            chain.append(h)
            h = self.block_content[block][1][0]
        return chain

    # -- allocation --------------------------------------------------------------------
    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        need = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # hits now sitting in the free queue
        return need + revived <= self.num_free_blocks - self.watermark_blocks

    def admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        """Give a waiting seq its prefix hits and blocks for num_new_tokens more."""
        for block in hits:
            self._take(block)
            self.cached.move_to_end(self.block_content[block][0])  # used now
        seq.block_ids = list(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_cached_tokens
        self.grow(seq, num_new_tokens)

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        return need <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need > self.num_free_blocks:
            raise RuntimeError(f"request {seq.request_id} needs {need} blocks, {self.num_free_blocks} free")
        if need > 0:
            seq.block_ids.extend(self._take_free_blocks(need))

    def free(self, seq: Sequence) -> None:
        self.release(reversed(seq.block_ids))
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def reserve(self, num_blocks: int) -> list[int]:
        """Blocks for KV that another engine will send (migration, prefill→decode)."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(f"cannot reserve {num_blocks} blocks, {self.num_free_blocks} free")
        return self._take_free_blocks(num_blocks)

    def pin(self, block: int) -> None:
        """One more reference to a block in use, so that it outlives its request while
        a migration copies it; release() drops it."""
        if self.ref_counts[block] < 1:
            raise RuntimeError(f"block {block} is not in use; only a held block can be pinned")
        self._take(block)

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block. Pass a sequence's blocks tail first: its
        tail is the least likely to be shared, so it goes first in the LRU order."""
        for block in block_ids:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if block not in self.block_content:
                    # Holds nothing reusable: hand it out before any cached block.
                    self.free_queue.move_to_end(block, last=False)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _take_free_blocks(self, n: int) -> list[int]:
        """The n least recently freed blocks (a prompt takes many at once: a hot path)."""
        free, contents, cached, refs = self.free_queue, self.block_content, self.cached, self.ref_counts
        taken = []
        for _ in range(n):
            block, _ = free.popitem(last=False)
            content = contents.pop(block, None)
            if content is not None:
                del cached[content[0]]  # evict: its slots are about to be overwritten
            refs[block] = 1
            taken.append(block)
        return taken
