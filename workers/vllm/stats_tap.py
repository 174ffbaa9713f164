"""What vLLM's scheduler tells its stat loggers, kept for yard's load reports and
metrics. vLLM calls `record` after every step that has stats (on the worker's
stepping thread, since the engine core runs in-process); the worker reads the
totals between steps, on the same thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass(slots=True)
class SchedulerTotals:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # share of the KV blocks in use, 0..1
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int = 0
    prompt_tokens: int = 0  # since start
    computed_prompt_tokens: int = 0  # prompt tokens run through the model (not cache hits)
    generation_tokens: int = 0
    preemptions: int = 0


class StatsTap(StatLoggerBase):
    """A stat logger that keeps the latest scheduler stats and sums the iteration
    stats. The engine makes one and hands vLLM `factory`, which returns it."""

    def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:
        self.totals = SchedulerTotals()

    def factory(self, vllm_config: Any, engine_index: int = 0) -> "StatsTap":
        return self

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        t = self.totals
        if scheduler_stats is not None:
            t.num_running = scheduler_stats.num_running_reqs
            t.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            t.kv_cache_usage = scheduler_stats.kv_cache_usage
            prefix = scheduler_stats.prefix_cache_stats
            t.prefix_queries += prefix.queries
            t.prefix_hits += prefix.hits
        if iteration_stats is not None:
            t.prompt_tokens += iteration_stats.prompt_token_stats.total
            t.computed_prompt_tokens += iteration_stats.prompt_token_stats.computed
            t.generation_tokens += iteration_stats.num_generation_tokens
            t.preemptions += iteration_stats.num_preempted_reqs

    def log_engine_initialized(self) -> None:
        pass
