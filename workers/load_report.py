"""A worker's load, as it reports it to the cluster manager and the routers."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # routers import freeness from here without pulling in torch
    from workers.engine.engine import LLMEngine
    from workers.engine.interface import WorkerEngine


@dataclass(frozen=True, slots=True)
class RequestLoad:
    """One request on a worker, as migration policies see it."""

    request_id: str
    priority: int
    num_blocks: int  # KV blocks it holds (0 while it waits)
    arrival_time: float
    running: bool  # in the batch (else waiting for it)
    migrating: bool  # a migration of it is in flight
    # It may move by recompute (workers/recompute_move.py): what a worker that cannot
    # move KV drains by.
    recomputable: bool = True


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
    block_size: int = 16
    draining: bool = False
    head_of_line_blocks: int = 0  # blocks the first waiting request needs (0: none waits)
    head_of_line_priority: int = 0
    requests: tuple[RequestLoad, ...] = ()  # running, then waiting
    migrations_out: int = 0  # in flight now
    migrations_in: int = 0
    node_ip: str = ""  # the Ray node the worker runs on (what a node's preStop hook drains)
    num_preemptions: int = 0  # since the worker started
    max_model_len: int = 0  # the longest sequence it can run (0: not told)
    queued_prefill_tokens: int = 0  # prompt tokens admitted here and not yet computed
    backend: str = "yard"  # the engine inside (workers/engine/interface.py)
    kv_migration: bool = True  # its requests can move with their KV, and others' can move here
    pool: str = ""  # the worker's pool (WorkerConfig.pool)
    # Workers of one non-empty group move requests between them with their KV (yard's
    # live migration, or vLLM's handover): what the load-driven migration rules pair.
    # Empty: its requests move by recompute only, and only out of a drain.
    kv_group: str = ""


@dataclass(frozen=True, slots=True)
class KVLoad:
    """The part of a load report that an engine's stats do not hold: its queue's head,
    its requests and its cached prefix blocks."""

    block_size: int
    head_of_line_blocks: int  # blocks the first waiting request needs (0: none waits)
    head_of_line_priority: int
    requests: tuple[RequestLoad, ...]  # running, then waiting
    cached_block_hashes: frozenset[int]


def freeness(free_blocks: int, num_running: int, head_of_line_blocks: int, block_size: int) -> float:
    """Decode steps the running batch can still take before the KV cache is full
    (Llumnix's freeness), after setting aside the blocks the head-of-line waiting
    request needs to be admitted:

        (free_blocks - head_of_line_blocks) * block_size / max(num_running, 1)

    Each decode step adds one token per running request, so free token slots divided by
    the batch size is the number of steps left. It is negative when the queue's head
    does not fit: the worker is already overloaded, and more so the more negative.
    An idle worker (num_running 0) divides by 1: its free token slots.
    """
    for name, value in (("free_blocks", free_blocks), ("num_running", num_running),
                        ("head_of_line_blocks", head_of_line_blocks)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return (free_blocks - head_of_line_blocks) * block_size / max(num_running, 1)


def block_manager_load(engine: "LLMEngine", max_hashes: int) -> KVLoad:
    """KVLoad of an engine with yard's block manager and scheduler (LLMEngine, or the
    simulator's SimEngine, which keeps the same attributes)."""
    blocks = engine.blocks
    waiting = list(engine.scheduler.waiting)
    running = list(engine.scheduler.running)
    head = waiting[0] if waiting else None
    requests = tuple(RequestLoad(s.request_id, s.priority, len(s.block_ids), s.arrival_time, i < len(running),
                                 False) for i, s in enumerate(running + waiting))
    return KVLoad(blocks.block_size,
                  blocks.blocks_needed(head.num_tokens) if head is not None else 0,
                  head.priority if head is not None else 0, requests,
                  frozenset(blocks.cached_block_hashes(max_hashes)))


def load_report(engine: "WorkerEngine", worker_id: str, role: str, max_hashes: int, draining: bool = False,
                migrating_out: frozenset[str] = frozenset(), migrations_in: int = 0, node_ip: str = "",
                now: Optional[float] = None, hashes: Optional[frozenset[int]] = None, pool: str = "",
                kv_group: Optional[str] = None) -> LoadReport:
    """Built by the thread that steps `engine`, between two steps. `now`: the report's
    time (default: the wall clock; the simulator passes its own). `hashes`: cached
    block hashes taken earlier, to carry instead of collecting them again. `kv_group`:
    see LoadReport (default: one group of every engine that migrates KV)."""
    stats = engine.stats()
    kv = engine.kv_load(0 if hashes is not None else max_hashes)
    requests = tuple(dataclasses.replace(r, migrating=True) if r.request_id in migrating_out else r
                     for r in kv.requests)
    return LoadReport(
        worker_id=worker_id, role=role, healthy=engine.healthy,
        num_running=stats.num_running, num_waiting=stats.num_waiting,
        free_blocks=stats.num_free_blocks, total_blocks=stats.num_total_blocks,
        freeness=freeness(stats.num_free_blocks, stats.num_running, kv.head_of_line_blocks, kv.block_size),
        mean_step_time_s=stats.mean_step_time_s, cached_block_hashes=kv.cached_block_hashes if hashes is None else hashes,
        reported_at=time.time() if now is None else now, block_size=kv.block_size, draining=draining,
        head_of_line_blocks=kv.head_of_line_blocks, head_of_line_priority=kv.head_of_line_priority,
        requests=requests, migrations_out=len(migrating_out), migrations_in=migrations_in, node_ip=node_ip,
        num_preemptions=stats.num_preemptions, max_model_len=engine.max_model_len,
        queued_prefill_tokens=stats.queued_prefill_tokens, backend=engine.capabilities.backend,
        kv_migration=engine.capabilities.kv_migration, pool=pool or role,
        kv_group=kv_group if kv_group is not None else ("yard" if engine.capabilities.kv_migration else ""),
    )


def kv_group_of(backend: str, layout: object) -> str:
    """The kv_group of an engine whose moved KV must have `layout` (a frozen dataclass
    of plain values, so its repr is stable across processes); "" without one."""
    if layout is None:
        return ""
    return f"{backend}:{hashlib.sha256(repr(layout).encode()).hexdigest()[:16]}"
