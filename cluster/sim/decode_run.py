"""Decode runs: the steps of a batch that only decodes, simulated as one event.

While nothing waits and every running request decodes, each step is the same
decision: every request computes one token. The scheduler would take a new block for
a request each time its last block fills, register each block its KV fills in the
prefix cache, and nothing else, until a request finishes or blocks run out. A run does
exactly those block operations, in the order the steps would (step by step, and in
batch order within a step), but touches a request only when one of its blocks changes:
about two operations per request per block_size steps instead of one per step.

The run ends with the step in which the first request finishes (that step is a
normal one, through SimEngine.finish), before a step that would need more blocks than
are free (that step is planned normally: it preempts), or, when a command reaches the
worker, with the step under way (the worker runs commands between steps). Whoever
reads the engine meanwhile sees it as the step-by-step simulation would at that time:
materialize() applies the steps done by then and plans the step under way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from cluster.sim.engine import OUTPUT_TOKEN, PlannedStep, Produced
from workers.engine.sequence import Sequence

if TYPE_CHECKING:
    from cluster.sim.engine import SimEngine

MIN_STEPS = 2  # a run of one step is just a step


@dataclass(slots=True)
class _Member:
    seq: Sequence
    computed: int  # tokens computed when the run started
    tokens: int  # tokens when the run started (computed + 1: the next one to compute)


class DecodeRun:
    def __init__(self, engine: "SimEngine", members: list[_Member], start_s: float, ends: list[float],
                 durations: list[float]) -> None:
        self.engine = engine
        self.members = members
        self.start_s = start_s
        self.ends = ends  # end time of each step
        self.durations = durations
        self.planned = 0  # steps whose blocks were taken (the plan)
        self.finished = 0  # steps whose KV was committed (all but the last are finished here)
        # Members by the phase of their blocks, in batch order: at step j those of phase
        # j % block_size take a block, and those of phase (j + 1) % block_size fill one.
        bs = engine.blocks.block_size
        self._by_phase: list[list[_Member]] = [[] for _ in range(bs)]
        for m in members:
            self._by_phase[-m.computed % bs].append(m)

    @property
    def steps(self) -> int:
        return len(self.ends)

    @property
    def end_s(self) -> float:
        return self.ends[-1]

    @classmethod
    def start(cls, engine: "SimEngine", now: float) -> Optional["DecodeRun"]:
        """A run from this step boundary, or None when the next step is not a plain
        decode step of the same batch (or the run would be too short)."""
        sched, blocks = engine.scheduler, engine.blocks
        running = sched.running
        if (sched.waiting or not running or len(running) > sched.config.max_num_batched_tokens
                or not engine.destination.idle):
            return None
        running.sort(key=lambda s: s.sort_key)  # what the scheduler's next step would do
        members = []
        for seq in running:
            if (seq.num_tokens - seq.num_computed_tokens != 1 or seq.first_output_at is None
                    or len(seq.block_ids) != blocks.blocks_needed(seq.num_computed_tokens)):
                return None
            members.append(_Member(seq, seq.num_computed_tokens, seq.num_tokens))
        steps = min(seq.max_tokens - seq.num_output_tokens for seq in running)
        steps = min(steps, _steps_with_blocks(members, blocks.block_size, blocks.num_free_blocks, steps))
        if steps < MIN_STEPS:
            return None
        # The same floats as the step-by-step batch_shape and step_s, added up in order.
        durations = engine.timing.decode_steps_s(len(members), sum(m.computed + 1 for m in members), steps)
        ends = list(itertools.accumulate(durations, initial=now))[1:]
        return cls(engine, members, now, ends, durations)

    def step_at(self, now: float) -> int:
        """The step under way at `now` (the last one if now is past every other's end)."""
        for j in range(self.finished, self.steps - 1):
            if now < self.ends[j]:
                return j
        return self.steps - 1

    def cut(self, now: float) -> None:
        """End the run with the step under way at `now` (a command arrived)."""
        last = self.step_at(now)
        del self.ends[last + 1:]
        del self.durations[last + 1:]

    def materialize(self, now: float) -> None:
        """The engine as the step-by-step simulation leaves it at `now`: the steps that
        ended by then done, the step under way planned (its blocks taken)."""
        self._advance(self.step_at(now))

    def finish(self) -> list[Produced]:
        """At the run's end: every step before the last done, the last through the
        engine's own finish."""
        last = self.steps - 1
        self._advance(last)
        for m in self.members:
            self._sync(m, last, last)
        return self.engine.finish(PlannedStep(tuple((m.seq, 1) for m in self.members), self.durations[last]))

    def _advance(self, current: int) -> None:
        """Finish steps [finished, current) and plan steps [planned, current]."""
        blocks = self.engine.blocks
        bs = blocks.block_size
        first = self.finished
        while self.finished < current or self.planned <= current:
            j = self.finished
            if self.planned <= j:
                for m in self._by_phase[j % bs]:  # the plan: a block for each whose last one is full
                    self._sync(m, j, j)
                    blocks.grow(m.seq, 1)
                self.planned = j + 1
            if j == current:
                break
            for m in self._by_phase[(j + 1) % bs]:  # step j's KV is in: register the blocks it filled
                self._sync(m, j + 1, j)  # before its token is appended, as in SimEngine.finish
                blocks.commit_computed(m.seq)
            self.finished = j + 1
        self.engine.record_steps(self.durations[first:self.finished])
        for m in self.members:
            self._sync(m, self.finished, self.finished)

    @staticmethod
    def _sync(m: _Member, computed_steps: int, appended: int) -> None:
        """The request once `computed_steps` steps computed its KV and `appended` of
        them gave it their token."""
        seq = m.seq
        seq.num_computed_tokens = m.computed + computed_steps
        missing = m.tokens + appended - len(seq.token_ids)
        if missing > 0:
            seq.token_ids.extend([OUTPUT_TOKEN] * missing)


def _steps_with_blocks(members: list[_Member], block_size: int, free: int, limit: int) -> int:
    """How many steps, up to `limit`, find a free block for every request that needs
    one (in the first step that would not, the scheduler preempts)."""
    per_phase = [0] * block_size  # requests taking a block at steps j with j % block_size == phase
    for m in members:
        per_phase[(-m.computed) % block_size] += 1
    taken = 0
    for j in range(limit):
        taken += per_phase[j % block_size]
        if taken > free:
            return j
    return limit
