"""Moving a request between simulated workers, KV and all: live migrations that the
migration policy orders, and prefill-to-decode handoffs.

The protocol is the workers' (workers/migration.py), on the engines' real handoff
code: the source starts, the destination reserves, the source pre-copies stages while
the request decodes, pauses, copies the rest, the destination commits, the source
completes. Each call runs in the inbox of the worker it touches, between two of its
steps, as on the stepping thread; each copy takes the step-time model's transfer time.

A handoff starts when its request is admitted to the prefill worker: the decode
worker reserves then, and the request pauses right after its first token. What is
simpler than the cluster (docs/simulate.md): when the prompt streamed while it
computed, only the last block's copy is charged after the first token, the streamed
blocks being taken as hidden behind the prefill.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

from cluster.sim.loop import EventLoop
from cluster.sim.results import MigrationRecord
from cluster.sim.step_time import StepTimeModel
from cluster.sim.worker import SimWorker
from workers.engine.handoff import HandoffError, MigratedRequest

# As the worker's: a decode worker without room is asked again after this long, and a
# handoff whose request was preempted (to be recomputed) starts again this often.
HANDOFF_RETRY_S = 0.05
HANDOFF_RESTARTS = 3
_PAUSE_NOW = 1 << 30


@dataclass(frozen=True)
class MoveSettings:
    pause_blocks: int = 1  # pre-copy stops once at most this many blocks are unsent
    max_stages: int = 8  # then it pauses anyway
    handoff_wait_s: float = 5.0  # a full decode worker is asked again for this long
    handoff_streaming: bool = True  # the prompt's KV streams while it computes


@dataclass(slots=True)
class _Move:
    migration_id: str
    request_id: str
    source: SimWorker
    dest: SimWorker
    reason: str
    started_s: float
    started: bool = False
    reserved: bool = False
    stages: int = 0
    blocks: int = 0


class Mover:
    def __init__(self, loop: EventLoop, timing: StepTimeModel, settings: MoveSettings,
                 on_moved: Callable[[str, str, str], None]) -> None:
        self.loop = loop
        self.timing = timing
        self.settings = settings
        self.on_moved = on_moved  # (request id, source id, destination id) once committed
        self.in_flight: dict[str, _Move] = {}
        # Handoffs reserved on their decode worker, waiting for the request's first token.
        self._awaiting: dict[str, tuple[_Move, Callable[[str, Optional[HandoffError]], None]]] = {}
        self.records: list[MigrationRecord] = []
        self._ids = itertools.count()

    def migrate(self, request_id: str, source: SimWorker, dest: SimWorker, reason: str,
                on_end: Optional[Callable[[MigrationRecord], None]] = None) -> None:
        move = _Move(f"m{next(self._ids)}", request_id, source, dest, reason, self.loop.now)
        self.in_flight[move.migration_id] = move
        source.migrating_out.add(request_id)
        dest.migrations_in += 1
        source.post(lambda: self._begin(move, on_end))

    def hand_off(self, request_id: str, source: SimWorker, dest: SimWorker) -> None:
        """From the request's admission to the prefill worker: reserve on the decode
        worker (asking again while it is full), move after the first token."""
        deadline = self.loop.now + self.settings.handoff_wait_s
        restarts = 0

        def again(record: MigrationRecord) -> None:
            nonlocal restarts
            if record.outcome == "committed" or request_id not in source.engine.requests:
                return
            if record.error.startswith("preempted") and restarts < HANDOFF_RESTARTS:
                restarts += 1
                self.migrate(request_id, source, dest, "handoff", again)
            elif record.error.startswith("no_room") and self.loop.now < deadline:
                self.loop.after(HANDOFF_RETRY_S, self.migrate, request_id, source, dest, "handoff", again)
        self.migrate(request_id, source, dest, "handoff", again)

    def first_token(self, request_id: str) -> None:
        """A request's first token is out: its handoff, if reserved, pauses it now."""
        waiting = self._awaiting.pop(request_id, None)
        if waiting is not None:
            move, end = waiting
            move.source.post(lambda: self._advance(move, end))

    # -- the protocol, one call per step boundary -------------------------------------------
    def _begin(self, m: _Move, on_end: Optional[Callable[[MigrationRecord], None]]) -> None:
        m_end = self._ender(m, on_end)
        try:
            num_tokens = m.source.engine.start_migration(m.migration_id, m.request_id)
        except HandoffError as e:
            return m_end("aborted", e)
        m.started = True
        m.dest.post(lambda: self._reserve(m, num_tokens, m_end))

    def _reserve(self, m: _Move, num_tokens: int, end: Callable[[str, Optional[HandoffError]], None]) -> None:
        try:
            m.dest.engine.reserve_migration(m.migration_id, m.request_id, num_tokens)
        except HandoffError as e:
            return end("aborted", e)
        m.reserved = True
        entry = m.source.engine.requests.get(m.request_id)
        if m.reason == "handoff" and entry is not None and entry.seq.first_output_at is None:
            self._awaiting[m.request_id] = (m, end)
        else:
            m.source.post(lambda: self._advance(m, end))

    def _advance(self, m: _Move, end: Callable[[str, Optional[HandoffError]], None]) -> None:
        handoff = m.reason == "handoff"
        pause_at = _PAUSE_NOW if handoff or m.stages >= self.settings.max_stages else self.settings.pause_blocks
        try:
            step = m.source.engine.advance_migration(m.migration_id, pause_at)
        except HandoffError as e:
            return end("aborted", e)
        m.stages += 1
        sent = len(step.stage.block_ids)
        m.blocks += sent
        if handoff and self.settings.handoff_streaming:
            sent = min(sent, 1)  # the prompt's full blocks left while it computed
        state = step.state
        if state is not None:
            self.loop.after(self.timing.transfer_s(sent), m.dest.post, lambda: self._commit(m, state, end))
        else:
            self.loop.after(self.timing.transfer_s(sent), m.dest.post, lambda: self._grow(m, end))

    def _grow(self, m: _Move, end: Callable[[str, Optional[HandoffError]], None]) -> None:
        entry = m.source.engine.requests.get(m.request_id)
        try:
            if entry is None:
                raise HandoffError("finished", f"request {m.request_id} left its source during the migration")
            # The source tells its token count with the stage; the reservation follows.
            m.dest.engine.destination.grow(m.migration_id, entry.seq.num_tokens)
        except HandoffError as e:
            return end("aborted", e)
        m.source.post(lambda: self._advance(m, end))

    def _commit(self, m: _Move, state: MigratedRequest, end: Callable[[str, Optional[HandoffError]], None]) -> None:
        try:
            m.dest.engine.commit_migration(m.migration_id, state)
        except (HandoffError, ValueError) as e:
            return end("aborted", e if isinstance(e, HandoffError) else HandoffError("bad_state", str(e)))
        m.reserved = False
        m.source.post(lambda: self._complete(m, end))

    def _complete(self, m: _Move, end: Callable[[str, Optional[HandoffError]], None]) -> None:
        m.source.engine.complete_migration(m.migration_id)
        m.started = False
        end("committed", None)
        self.on_moved(m.request_id, m.source.worker_id, m.dest.worker_id)

    def _ender(self, m: _Move, on_end: Optional[Callable[[MigrationRecord], None]]
               ) -> Callable[[str, Optional[HandoffError]], None]:
        def end(outcome: str, error: Optional[HandoffError]) -> None:
            """Both sides let go (the request goes on at the source unless it committed)."""
            if m.reserved:
                m.dest.post(lambda: m.dest.engine.destination.cancel(m.migration_id))
            if m.started:
                m.source.post(lambda: m.source.engine.source.resume(m.migration_id))
            del self.in_flight[m.migration_id]
            self._awaiting.pop(m.request_id, None)
            m.source.migrating_out.discard(m.request_id)
            m.dest.migrations_in -= 1
            record = MigrationRecord(m.migration_id, m.request_id, m.source.worker_id, m.dest.worker_id, m.reason,
                                     outcome, m.started_s, self.loop.now, m.stages, m.blocks,
                                     "" if error is None else f"{error.reason}: {error}")
            self.records.append(record)
            if on_end is not None:
                on_end(record)
        return end
