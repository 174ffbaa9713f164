"""Moving KV blocks from one worker to another, off both engines' step paths.

A transport is two blocking calls, each run on a thread of its own while the
engines keep stepping: `send` at the source (read the pinned blocks, make them
reachable from anywhere) and `receive` at the destination (write them into reserved
blocks). The payload is what travels between the two, through whatever carries the
workers' calls; the KV itself never passes through the router or the manager.

With tensor parallelism each rank holds a shard of every block (its KV heads). Rank
r of the source sends its shard to rank r of the destination: the ranks read and
write their own shards, and nothing is gathered on rank 0.

A payload holds all layers of its blocks, or a range of layers: a streaming handoff
sends a forward's blocks layer range by layer range as the forward writes them. Its
caller waits for the leader's layers (LLMEngine.wait_layers); each other rank waits
for its own, named by forward_id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

if TYPE_CHECKING:
    from workers.engine.engine import LLMEngine


@dataclass(frozen=True, slots=True)
class KVPayload:
    """Blocks in flight: one shard per tensor-parallel rank, in rank order, each
    [layers, 2, num_blocks, block_size, kv_heads of the rank, head_dim]."""

    shards: tuple[Any, ...]  # what the transport carries: object refs, or tensors in-process
    num_blocks: int
    nbytes: int
    layers: Optional[tuple[int, int]] = None  # [start, stop); None: every layer


Layers = Optional[tuple[int, int]]


class KVTransport(Protocol):
    name: str

    def send(self, engine: "LLMEngine", block_ids: Sequence[int], layers: Layers = None,
             forward_id: Optional[int] = None) -> KVPayload: ...

    def receive(self, engine: "LLMEngine", migration_id: str, first_block: int, payload: KVPayload) -> None: ...


class ObjectStoreTransport:
    """Ray's object store: works between any two nodes, CPU or GPU (a GPU cache is
    staged through host memory). Each shard is one object; the destination's ranks
    fetch their own from wherever the source's ranks put them."""

    name = "object_store"

    def send(self, engine: "LLMEngine", block_ids: Sequence[int], layers: Layers = None,
             forward_id: Optional[int] = None) -> KVPayload:
        import ray

        ids = list(block_ids)
        others = [rank.read_shard.remote(ids, layers, forward_id) for rank in engine.tp_ranks]
        local = engine.read_kv(ids, layers)
        # The blocks may be unpinned once send returns: every rank must have read them.
        ray.get(others)
        shard_bytes = local.numel() * local.element_size()
        return KVPayload((ray.put(local), *others), len(ids), shard_bytes * (1 + len(others)), layers)

    def receive(self, engine: "LLMEngine", migration_id: str, first_block: int, payload: KVPayload) -> None:
        import ray

        ranks = engine.tp_ranks
        if len(payload.shards) != 1 + len(ranks):
            raise ValueError(f"KV payload has {len(payload.shards)} shards, this instance has {1 + len(ranks)} ranks")
        ids = list(engine.begin_kv_write(migration_id, first_block, payload.num_blocks))
        try:
            # Top-level refs: each rank fetches its shard straight from the source's rank.
            writes = [rank.write_shard.remote(ids, ref, payload.layers) for rank, ref in zip(ranks, payload.shards[1:])]
            engine.write_kv(ids, ray.get(payload.shards[0]), payload.layers)
            ray.get(writes)
        finally:
            engine.end_kv_write(migration_id)


class InProcessTransport:
    """Tensors handed over directly: two engines in one process (tests, benchmarks of
    the engine alone). Tensor parallelism needs the object store."""

    name = "in_process"

    def send(self, engine: "LLMEngine", block_ids: Sequence[int], layers: Layers = None,
             forward_id: Optional[int] = None) -> KVPayload:
        if engine.tp_ranks:
            raise ValueError("the in-process transport moves TP=1 instances only")
        data = engine.read_kv(list(block_ids), layers)  # a copy (indexed), not a view
        return KVPayload((data,), len(block_ids), data.numel() * data.element_size(), layers)

    def receive(self, engine: "LLMEngine", migration_id: str, first_block: int, payload: KVPayload) -> None:
        ids = engine.begin_kv_write(migration_id, first_block, payload.num_blocks)
        try:
            engine.write_kv(ids, payload.shards[0], payload.layers)
        finally:
            engine.end_kv_write(migration_id)
