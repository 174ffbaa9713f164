"""Which heads each attention worker holds: KV heads split in K equal runs, with the
query heads that read them (grouped-query attention keeps each group whole)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadShard:
    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int


def head_shards(num_heads: int, num_kv_heads: int, workers: int) -> list[HeadShard]:
    if num_kv_heads % workers:
        raise ValueError(f"attention_offload.workers {workers} must divide the model's {num_kv_heads} KV heads")
    kv, q = num_kv_heads // workers, num_heads // workers
    return [HeadShard(j * q, q, j * kv, kv) for j in range(workers)]
