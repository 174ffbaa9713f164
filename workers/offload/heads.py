"""Which heads each attention worker holds: KV heads split in K equal runs, with the
query heads that read them (grouped-query attention keeps each group whole). With
tensor parallelism each rank's heads go to K / tp_size attention workers of its own."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadShard:
    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int


def rank_shards(num_heads: int, num_kv_heads: int, workers: int, tp_size: int = 1) -> list[HeadShard]:
    """The shards of one rank's heads, numbered from the rank's first head (each rank
    holds the same number)."""
    if num_kv_heads % workers:
        raise ValueError(f"attention_offload.workers {workers} must divide the model's {num_kv_heads} KV heads")
    if workers % tp_size:
        raise ValueError(f"attention_offload.workers {workers} must be a multiple of tensor_parallel_size "
                         f"{tp_size}: each rank sends its heads to attention workers of its own")
    per_rank = workers // tp_size
    kv, q = num_kv_heads // workers, num_heads // workers
    return [HeadShard(j * q, q, j * kv, kv) for j in range(per_rank)]
