"""Continuous batching with chunked prefill, priorities and preemption by recompute.

Each step has a token budget. Running requests go first, in priority order (decodes
cost one token each), and the rest of the budget is filled with prefill chunks of
waiting requests: Sarathi-Serve's stall-free batching. When blocks run out, the
lowest-priority, latest-arriving running request is preempted: its blocks are freed
and it waits to be recomputed from its prompt plus the tokens it already produced,
so nothing it generated is lost. Pure Python; the clock is the caller's.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from workers.engine.block_manager import BlockManager
from workers.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class SchedulerOutput:
    # request id -> tokens to compute this step, decodes (one token) listed first
    chunks: dict[str, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self._running_sorted = True  # no request joined the batch since it was last sorted
        self.num_preemptions = 0
        # Sequences promised to requests on their way here (migration reservations):
        # they count against max_num_seqs like running ones.
        self.num_reserved_seqs = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def remove(self, seq: Sequence) -> None:
        """Take a request out (finished or aborted) and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED

    def admit_running(self, seq: Sequence) -> None:
        """A request whose KV already sits in this engine's blocks (imported)."""
        seq.status = Status.RUNNING
        self.running.append(seq)
        self._running_sorted = False

    def pause(self, seq: Sequence) -> None:
        """Take seq out of the batch and the queue, keeping its blocks (the last stage
        of a migration copies them while nothing writes them)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            raise ValueError(f"request {seq.request_id} is {seq.status.value}, not running or waiting")
        seq.status = Status.PAUSED

    def unpause(self, seq: Sequence) -> None:
        """Back where it was: running if it holds KV, else waiting."""
        if seq.status is not Status.PAUSED:
            raise ValueError(f"request {seq.request_id} is {seq.status.value}, not paused")
        if seq.block_ids:
            self.admit_running(seq)
        else:
            self.add(seq)

    @property
    def has_room_for_another_seq(self) -> bool:
        return len(self.running) + self.num_reserved_seqs < self.config.max_num_seqs

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens (and recomputes) admitted or waiting and not yet computed: what
        a new request's first token waits behind (the P/D router's and scaler's signal)."""
        return sum(q.num_uncomputed_tokens for q in (*self.running, *self.waiting)
                   if q.num_computed_tokens == 0 or q.num_uncomputed_tokens > 1)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        # A request's priority and arrival never change, and leaving keeps the order:
        # the batch needs sorting only after requests joined it.
        if not self._running_sorted:
            self.running.sort(key=lambda s: s.sort_key)
            self._running_sorted = True
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        # Decodes first: the model runner batches them together.
        if any(n != 1 for n in out.chunks.values()):
            out.chunks = dict(sorted(out.chunks.items(), key=lambda kv: kv[1] != 1))
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.blocks.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, n)
                out.chunks[seq.request_id] = n
                budget -= n
                i += 1
                continue
            break  # seq preempted itself: everything after it is gone too
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and self.has_room_for_another_seq:
            seq = self.waiting[0]
            hits = self.blocks.lookup_prefix(seq)
            n = seq.num_tokens - len(hits) * self.blocks.block_size
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    return
                n = budget
            if not self._make_room(seq, hits, n, out):
                return
            self.waiting.pop(0)
            self.blocks.admit(seq, hits, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._running_sorted = False
            out.chunks[seq.request_id] = n
            budget -= n

    def _make_room(self, seq: Sequence, hits: list[int], n: int, out: SchedulerOutput) -> bool:
        """Free blocks for `seq` by preempting strictly lower-priority running requests."""
        while not self.blocks.can_admit(seq, hits, n):
            victim = self.running[-1] if self.running else None
            if victim is None or victim.priority >= seq.priority:
                return False
            self._preempt(victim, out)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        out.chunks.pop(seq.request_id, None)
        self.blocks.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        self.add(seq)
