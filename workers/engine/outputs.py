"""What the engine reports: per-request step outputs and engine stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:  # the simulator reads these types without torch
    from workers.engine.sampler import SampledToken


@dataclass(frozen=True, slots=True)
class SeqTiming:
    """A request's times in one engine (the engine's clock), on its first output there
    and on its last: enough for the per-phase latency breakdown."""

    added_at: float  # admitted, or committed by a migration
    first_scheduled_at: float
    first_output_at: float
    now: float
    migrated_in: bool  # its prompt was computed elsewhere
    first: bool  # this is its first output in this engine

    @property
    def queued_s(self) -> float:
        return self.first_scheduled_at - self.added_at


@dataclass(frozen=True, slots=True)
class StepOutput:
    """New tokens of one request from one step. `start_index` is the absolute output
    position of new_token_ids[0], so a consumer can drop what it already has."""

    request_id: str
    start_index: int
    new_token_ids: tuple[int, ...]
    new_logprobs: Optional[tuple[SampledToken, ...]]  # when the request asked for logprobs
    new_text: str
    finish_reason: Optional[str] = None  # "stop", "length", "abort" or "error"
    stop_reason: Union[int, str, None] = None  # the stop token id or stop string matched
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: Optional[str] = None  # why the request failed (finish_reason "error")
    timing: Optional[SeqTiming] = None  # on the request's first output in this engine, and on its last

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float  # hit tokens / prompt tokens looked up
    num_preemptions: int
    num_steps: int
    mean_step_time_s: float  # over the recent steps
    mean_model_time_s: float  # forward + logits part of those steps
    total_step_time_s: float  # since the engine started
    total_model_time_s: float
    prompt_tokens: int
    generation_tokens: int
    # Tokens run through the model (prompt chunks, then one per decode step): a request
    # that arrived with its KV adds only its decode steps.
    computed_tokens: int = 0
    num_migrated_in: int = 0  # requests committed here by a live migration
    queued_prefill_tokens: int = 0  # prompt tokens (and recomputes) admitted and not yet computed
    num_migrated_out: int = 0

    @property
    def overhead_share(self) -> float:
        """Share of step time spent outside the model: scheduling, sampling, bookkeeping."""
        if self.mean_step_time_s == 0:
            return 0.0
        return 1.0 - self.mean_model_time_s / self.mean_step_time_s
