"""A request's state inside one engine: its tokens, its blocks and how far it got."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from workers.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Out of the batch for the last stage of a live migration: blocks kept, never
    # scheduled, never a preemption victim.
    PAUSED = "paused"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    request_id: str
    token_ids: list[int]  # the prompt, then every generated token
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # params.max_tokens, capped by the room left under max_model_len
    priority: int = 0
    arrival_time: float = 0.0
    status: Status = Status.WAITING
    # KV state. Invariant: block_ids hold the KV of token_ids[:num_computed_tokens],
    # and the first num_hashed_blocks of them are registered in the prefix cache.
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_hashed_blocks: int = 0
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    num_cached_tokens: int = 0  # prefix-cache hits when it was last admitted
    num_preemptions: int = 0
    finish_reason: Optional[str] = None
    # When things happened in this engine (its clock), for the per-phase latency
    # breakdown: added (admitted or committed by a migration), first run, first token.
    added_at: float = 0.0
    first_scheduled_at: Optional[float] = None
    first_output_at: Optional[float] = None
    migrated_in: bool = False  # arrived by a live migration (or a prefill→decode handoff)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: higher priority first, then earlier arrival."""
        return (-self.priority, self.arrival_time)
