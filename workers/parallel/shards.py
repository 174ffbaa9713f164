"""Which slice of each weight a tensor-parallel rank holds.

Attention heads, the MLP's intermediate dimension and the vocabulary are split
across ranks. KV heads are split too; when there are more ranks than KV heads, each
KV head is replicated on size / kv_heads consecutive ranks, which keeps every rank's
query heads next to the KV head they read (grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.models.config import ModelConfig


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    q_heads: int  # query heads on this rank
    q_start: int  # first query head
    kv_heads: int
    kv_start: int
    intermediate: int  # MLP (or each expert's) intermediate size on this rank
    intermediate_start: int
    vocab_shard: int  # rows of the embedding / LM head per rank (the last may be padding)
    vocab_start: int
    vocab_size: int  # the model's, unpadded

    @property
    def vocab_end(self) -> int:
        """One past the last real vocabulary row this rank holds."""
        return min(self.vocab_start + self.vocab_shard, self.vocab_size)

    @classmethod
    def single(cls, cfg: ModelConfig) -> "ShardPlan":
        return cls.for_rank(cfg, 0, 1)

    @classmethod
    def for_rank(cls, cfg: ModelConfig, rank: int, size: int) -> "ShardPlan":
        heads, kv = cfg.num_heads, cfg.num_kv_heads
        if heads % size:
            raise ValueError(f"tensor_parallel_size={size} must divide num_attention_heads={heads}")
        if cfg.intermediate_size % size:
            raise ValueError(f"tensor_parallel_size={size} must divide intermediate_size={cfg.intermediate_size}")
        if size <= kv:
            if kv % size:
                raise ValueError(f"tensor_parallel_size={size} must divide num_key_value_heads={kv}")
            kv_heads, kv_start = kv // size, rank * (kv // size)
        else:
            if size % kv:
                raise ValueError(f"tensor_parallel_size={size} must be a multiple of num_key_value_heads={kv}")
            kv_heads, kv_start = 1, rank * kv // size
        inter = cfg.intermediate_size // size
        vocab_shard = -(-cfg.vocab_size // size)
        return cls(rank=rank, size=size, q_heads=heads // size, q_start=rank * (heads // size),
                   kv_heads=kv_heads, kv_start=kv_start, intermediate=inter,
                   intermediate_start=rank * inter, vocab_shard=vocab_shard,
                   vocab_start=rank * vocab_shard, vocab_size=cfg.vocab_size)
