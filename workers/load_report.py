"""A worker's load, as it reports it to the cluster manager and the routers."""

from __future__ import annotations

import time
from dataclasses import dataclass

from workers.engine.engine import LLMEngine


@dataclass(frozen=True, slots=True)
class LoadReport:
    worker_id: str
    role: str
    healthy: bool
    num_running: int
    num_waiting: int
    free_blocks: int
    total_blocks: int
    # Llumnix-style freeness: decode steps the running batch can still take before
    # blocks run out, after the head-of-line waiting request has taken its share.
    # Negative when even that request does not fit.
    freeness: float
    mean_step_time_s: float
    cached_block_hashes: frozenset[int]  # the newest ones, bounded
    reported_at: float


def freeness(free_blocks: int, head_of_line_blocks: int, num_running: int, block_size: int) -> float:
    """(free blocks - the head-of-line request's demand) × block_size / running requests:
    each running request needs one more slot per decode step."""
    return (free_blocks - head_of_line_blocks) * block_size / max(num_running, 1)


def load_report(engine: LLMEngine, worker_id: str, role: str, max_hashes: int) -> LoadReport:
    """Built by the thread that steps `engine`, between two steps."""
    stats = engine.stats()
    blocks = engine.blocks
    waiting = engine.scheduler.waiting
    head_demand = blocks.blocks_needed(waiting[0].num_tokens) if waiting else 0
    return LoadReport(
        worker_id=worker_id, role=role, healthy=engine.healthy,
        num_running=stats.num_running, num_waiting=stats.num_waiting,
        free_blocks=stats.num_free_blocks, total_blocks=stats.num_total_blocks,
        freeness=freeness(stats.num_free_blocks, head_demand, stats.num_running, blocks.block_size),
        mean_step_time_s=stats.mean_step_time_s,
        cached_block_hashes=frozenset(blocks.cached_block_hashes(max_hashes)),
        reported_at=time.time(),
    )
