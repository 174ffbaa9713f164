"""KV handoff between two engines: the engine side of live migration and of
prefill→decode handoff.

The source copies a running request's KV in stages while it keeps decoding: each
stage takes the full blocks computed since the last one. Then it pauses the request
between two steps, copies what is left with the request's state, and, once the
destination has committed, lets go of it. The destination reserves blocks that grow
with the request, and commits the request at the same absolute output index with
everything that decides its next tokens.

Every method here runs on the thread that steps the engine, except
`Destination.write`, which a transport calls from another thread while the engine
steps: the copy stays off the step path. Two rules make that safe:
  * a block the source is copying is pinned (one more reference), so a request that
    finishes, is aborted or is preempted meanwhile cannot hand it to another request;
  * a reservation being written counts its writers, and is only released when none
    is left, so an expiry never lets a late write land in another request's blocks.

A prefill→decode handoff streams: before each forward of the prompt, `Source.stream`
takes the blocks that forward fills, and the transport reads them layer by layer as
the forward writes them (layer_progress.py), so the KV leaves while later layers
compute. Nothing writes those blocks afterwards: a prompt's full blocks are final, and
its part-full last block only changes once the request decodes, after the pause.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from workers.engine.detokenizer import DetokenizerState, IncrementalDetokenizer
from workers.engine.sequence import Sequence, Status
from workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from workers.engine.block_manager import BlockManager
    from workers.engine.scheduler import Scheduler


# What a migration does while its request still computes its prompt: "pause" it
# (a live migration), or hold it and "stream" the KV as it is made, or "wait" for the
# first token (prefill→decode handoffs).
DURING_PREFILL = ("pause", "stream", "wait")


class HandoffError(RuntimeError):
    """A migration cannot go on; `reason` is a short code for metrics and logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple:
        # Raised in a destination actor, it travels back to the source pickled.
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True, slots=True)
class KVStage:
    """Blocks of the request's block table [first_block, first_block + len(block_ids)),
    as source block ids, pinned until the migration ends."""

    first_block: int
    block_ids: tuple[int, ...]
    num_remaining: int  # blocks holding computed KV that are still unsent after this stage


@dataclass(frozen=True, slots=True)
class MigratedRequest:
    """A paused request's state: what the destination needs to produce exactly the
    tokens the source would have. Sampling draws depend only on (seed, output index)
    and penalties on the tokens, so token ids and params carry both."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt, then output
    num_prompt_tokens: int
    params: SamplingParams
    priority: int
    arrival_time: float
    num_computed_tokens: int  # tokens whose KV the copied blocks hold (0: none, recompute)
    block_hashes: tuple[int, ...]  # chained hashes of its full blocks, computed once at the source
    num_cached_tokens: int
    detokenizer: DetokenizerState

    @property
    def next_index(self) -> int:
        """The absolute output index the destination produces first."""
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True, slots=True)
class MigrationStep:
    """One round of the source: a pre-copy stage, or, with `state`, the pause and the
    last stage. `in_prefill`: a stage of a request still computing its prompt, held
    there (no pause) until its first token is out."""

    stage: KVStage
    state: Optional[MigratedRequest] = None
    in_prefill: bool = False
    engine_step: int = 0  # the engine's step count when this round was taken
    # A streaming round taken before a forward: the stage's blocks are complete only
    # once that forward has written them, layer by layer (None: they already are).
    forward_id: Optional[int] = None
    final_prefill: bool = False  # that forward computes the prompt's end: the first token follows

    @property
    def paused(self) -> bool:
        return self.state is not None


@dataclass(slots=True)
class _Outgoing:
    migration_id: str
    seq: Sequence
    num_sent: int = 0  # leading blocks of seq.block_ids handed to the transport
    # The last of those was sent part-full, holding this many tokens' KV (the
    # prompt's end, streamed): sent again if the request computes more before the pause.
    partial_tokens: Optional[int] = None
    pinned: list[int] = field(default_factory=list)  # released when the migration ends
    ended: Optional[str] = None  # why the request left during the migration


class Source:
    """The source side: stages, pause, then resume (abort) or complete (committed)."""

    def __init__(self, blocks: "BlockManager", scheduler: "Scheduler",
                 requests: Mapping[str, Any]) -> None:
        self.blocks = blocks
        self.scheduler = scheduler
        # The engine's request table (id → entry with .detokenizer): the table itself,
        # not the engine, so that no cycle keeps a dropped engine (and its KV cache) alive.
        self.requests = requests
        self._by_id: dict[str, _Outgoing] = {}
        self._by_request: dict[str, _Outgoing] = {}

    def start(self, migration_id: str, seq: Sequence) -> None:
        if migration_id in self._by_id:
            raise HandoffError("duplicate", f"migration {migration_id} already runs here")
        if seq.request_id in self._by_request:
            raise HandoffError("busy", f"request {seq.request_id} is already migrating "
                                       f"({self._by_request[seq.request_id].migration_id})")
        if seq.status not in (Status.RUNNING, Status.WAITING):
            raise HandoffError("not_running", f"request {seq.request_id} is {seq.status.value}")
        out = _Outgoing(migration_id, seq)
        self._by_id[migration_id] = self._by_request[seq.request_id] = out

    def request_left(self, seq: Sequence, why: str) -> None:
        """The request finished, was aborted or preempted: its migration cannot commit.
        Pinned blocks stay pinned until the migration ends."""
        out = self._by_request.get(seq.request_id)
        if out is not None and out.seq is seq and out.ended is None:
            out.ended = why

    def advance(self, migration_id: str, pause_at_blocks: int, during_prefill: str = "pause") -> MigrationStep:
        """While more than pause_at_blocks blocks of computed KV are unsent, the next stage: the full
        blocks computed since the last one, the request still decoding. Otherwise
        pause: the request leaves the batch, and the last stage holds the rest (the
        last block may be partial) with the request's state. Nothing writes those
        blocks until resume().

        A prefill→decode handoff never pauses a request that has produced no token
        here yet. With during_prefill "stream", each stage then takes the full blocks
        its prompt chunks have computed so far (perhaps none), so the KV streams out
        while the prefill runs; with "wait", stages stay empty until the first token
        (the copy comes after the prefill, as DistServe's and vLLM's connectors do)."""
        if during_prefill not in DURING_PREFILL:
            raise ValueError(f"during_prefill must be one of {DURING_PREFILL}, got {during_prefill!r}")
        out = self._live(migration_id)
        seq = out.seq
        if out.partial_tokens is not None and out.partial_tokens != seq.num_computed_tokens:
            out.num_sent -= 1  # the part-full block has more KV now: it goes again
            out.partial_tokens = None
        if during_prefill != "pause" and seq.first_output_at is None:
            upto = seq.num_computed_tokens // self.blocks.block_size if during_prefill == "stream" else out.num_sent
            return MigrationStep(self._stage(out, upto), in_prefill=True)
        backlog = self.blocks.blocks_needed(seq.num_computed_tokens) - out.num_sent
        if backlog > pause_at_blocks:
            return MigrationStep(self._stage(out, seq.num_computed_tokens // self.blocks.block_size))
        self.scheduler.pause(seq)
        stage = self._stage(out, self.blocks.blocks_needed(seq.num_computed_tokens))
        return MigrationStep(stage, self._state(seq))

    def stream(self, migration_id: str, planned: Mapping[str, int], forward_id: Optional[int]) -> MigrationStep:
        """A streaming handoff's round before a forward (`planned`: request id → tokens
        it computes; empty between steps). While the prompt computes: a stage of the
        blocks it has filled by the end of this forward, the last one part-full if this
        forward ends the prompt (nothing writes it until the pause that follows the
        first token). The caller reads them layer by layer as the forward writes them.
        Once the first token is out: an empty round, not in prefill. Never pauses: the
        batch is already planned."""
        out = self._live(migration_id)
        seq = out.seq
        if seq.first_output_at is not None:
            return MigrationStep(KVStage(out.num_sent, (), 0))
        scheduled = planned.get(seq.request_id, 0)
        end = seq.num_computed_tokens + scheduled
        final = scheduled > 0 and end == seq.num_tokens
        stage = self._stage(out, self.blocks.blocks_needed(end) if final else end // self.blocks.block_size)
        if final and end % self.blocks.block_size and stage.block_ids:
            out.partial_tokens = end
        return MigrationStep(stage, in_prefill=True, forward_id=forward_id if scheduled else None,
                             final_prefill=final)

    def resume(self, migration_id: str) -> None:
        """The migration ended without commit: the request carries on here (if it is
        still here)."""
        out = self._pop(migration_id)
        if out is not None and out.ended is None and out.seq.status is Status.PAUSED:
            self.scheduler.unpause(out.seq)

    def complete(self, migration_id: str) -> Sequence:
        """The destination committed: drop the request here. Returns it; the caller
        removes it from the engine's table and frees its blocks."""
        out = self._live(migration_id)
        if out.seq.status is not Status.PAUSED:
            raise HandoffError("not_paused", f"migration {migration_id} was not paused before commit")
        self._pop(migration_id)
        return out.seq

    def _stage(self, out: _Outgoing, upto: int) -> KVStage:
        seq = out.seq
        first = out.num_sent
        ids = tuple(seq.block_ids[first:upto])
        for block in ids:
            self.blocks.pin(block)
        out.pinned.extend(ids)
        out.num_sent = max(upto, first)
        remaining = self.blocks.blocks_needed(seq.num_computed_tokens) - out.num_sent
        return KVStage(first, ids, max(remaining, 0))

    def _state(self, seq: Sequence) -> MigratedRequest:
        self.blocks.hash_full_blocks(seq)
        detok: IncrementalDetokenizer = self.requests[seq.request_id].detokenizer
        return MigratedRequest(seq.request_id, tuple(seq.token_ids), seq.num_prompt_tokens, seq.params,
                               seq.priority, seq.arrival_time, seq.num_computed_tokens,
                               tuple(seq.block_hashes), seq.num_cached_tokens, detok.state())

    def _live(self, migration_id: str) -> _Outgoing:
        out = self._by_id.get(migration_id)
        if out is None:
            raise HandoffError("unknown", f"no outgoing migration {migration_id!r} here")
        if out.ended is not None:
            raise HandoffError(out.ended, f"request {out.seq.request_id} {out.ended} during migration "
                                          f"{migration_id}")
        return out

    def _pop(self, migration_id: str) -> Optional[_Outgoing]:
        out = self._by_id.pop(migration_id, None)
        if out is not None:
            self._unpin(out)
            if self._by_request.get(out.seq.request_id) is out:
                del self._by_request[out.seq.request_id]
        return out

    def _unpin(self, out: _Outgoing) -> None:
        self.blocks.release(reversed(out.pinned))
        out.pinned.clear()


@dataclass(slots=True)
class _Incoming:
    migration_id: str
    request_id: str
    block_ids: list[int]
    expires_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    writers: int = 0  # writes in flight on other threads
    closed: bool = False  # no more writes; blocks go back once writers is 0


class Destination:
    """The destination side: a reservation that grows, writes from the transport, and
    the commit."""

    def __init__(self, blocks: "BlockManager", scheduler: "Scheduler", timeout_s: float,
                 clock: Callable[[], float]) -> None:
        self.blocks = blocks
        self.scheduler = scheduler
        self.timeout_s = timeout_s
        self.clock = clock
        self._by_id: dict[str, _Incoming] = {}
        self._closing: list[_Incoming] = []  # closed while a write was in flight

    @property
    def idle(self) -> bool:
        """No reservation is open or closing: nothing to expire."""
        return not self._by_id and not self._closing

    def holds(self, migration_id: str) -> bool:
        """Whether the reservation is still open (any thread may ask)."""
        return migration_id in self._by_id

    def reserving_request(self, request_id: str) -> bool:
        return any(inc.request_id == request_id for inc in self._by_id.values())

    def reserve(self, migration_id: str, request_id: str, num_tokens: int) -> tuple[int, ...]:
        """Blocks for num_tokens tokens of KV, within the watermark and max_num_seqs:
        a migration never forces a preemption here."""
        if migration_id in self._by_id:
            raise HandoffError("duplicate", f"migration {migration_id} already has a reservation here")
        if self.reserving_request(request_id):
            raise HandoffError("busy", f"request {request_id} is already on its way here")
        if not self.scheduler.has_room_for_another_seq:
            raise HandoffError("no_room", f"max_num_seqs={self.scheduler.config.max_num_seqs} reached")
        inc = _Incoming(migration_id, request_id, [], self.clock() + self.timeout_s)
        self._grow(inc, num_tokens)
        self._by_id[migration_id] = inc
        self.scheduler.num_reserved_seqs += 1
        return tuple(inc.block_ids)

    def grow(self, migration_id: str, num_tokens: int) -> tuple[int, ...]:
        """Extend the reservation to num_tokens tokens (the request kept decoding at the
        source); each call also extends its deadline."""
        inc = self._open(migration_id)
        self._grow(inc, num_tokens)
        inc.expires_at = self.clock() + self.timeout_s
        return tuple(inc.block_ids)

    def _grow(self, inc: _Incoming, num_tokens: int) -> None:
        need = self.blocks.blocks_needed(num_tokens) - len(inc.block_ids)
        spare = self.blocks.num_free_blocks - self.blocks.watermark_blocks
        if need > spare:
            raise HandoffError("no_room", f"{num_tokens} tokens need {need} more blocks; "
                                          f"{spare} are free above the watermark")
        if need > 0:
            inc.block_ids.extend(self.blocks.reserve(need))

    def begin_write(self, migration_id: str, first_block: int, num_blocks: int) -> tuple[int, ...]:
        """Block ids for a write (any thread); end_write must follow."""
        inc = self._by_id.get(migration_id)
        if inc is None:
            raise HandoffError("unknown", f"no KV reservation for migration {migration_id!r} "
                                          f"(expired, cancelled or never made)")
        with inc.lock:
            if inc.closed:
                raise HandoffError("cancelled", f"the reservation of migration {migration_id} was released")
            if first_block < 0 or first_block + num_blocks > len(inc.block_ids):
                raise HandoffError("bad_stage", f"blocks [{first_block}, {first_block + num_blocks}) exceed the "
                                                f"{len(inc.block_ids)} reserved for migration {migration_id}")
            inc.writers += 1
            # The deadline is on silence: a long prefill streaming its KV keeps it open.
            inc.expires_at = self.clock() + self.timeout_s
            return tuple(inc.block_ids[first_block:first_block + num_blocks])

    def end_write(self, migration_id: str) -> None:
        inc = self._by_id.get(migration_id) or next((c for c in self._closing if c.migration_id == migration_id),
                                                    None)
        if inc is not None:
            with inc.lock:
                inc.writers -= 1

    def commit(self, migration_id: str, state: MigratedRequest, seq: Sequence) -> None:
        """Hand the reserved blocks to `seq` (built by the engine from `state`) and put it
        in the batch (or the queue, without KV)."""
        inc = self._open(migration_id)
        with inc.lock:
            if inc.writers:
                raise HandoffError("busy", f"migration {migration_id} still has {inc.writers} write(s) in flight")
            needed = self.blocks.blocks_needed(state.num_computed_tokens)
            if needed > len(inc.block_ids):
                raise HandoffError("bad_stage", f"{state.num_computed_tokens} computed tokens need {needed} blocks, "
                                                f"migration {migration_id} reserved {len(inc.block_ids)}")
            inc.closed = True
        del self._by_id[migration_id]
        self.scheduler.num_reserved_seqs -= 1
        self.blocks.release(reversed(inc.block_ids[needed:]))
        seq.block_ids = inc.block_ids[:needed]
        seq.num_computed_tokens = state.num_computed_tokens
        seq.block_hashes = list(state.block_hashes[:seq.num_tokens // self.blocks.block_size])
        seq.num_cached_tokens = state.num_cached_tokens
        self.blocks.commit_computed(seq)
        if seq.block_ids:
            self.scheduler.admit_running(seq)
        else:
            self.scheduler.add(seq)

    def cancel(self, migration_id: str) -> bool:
        inc = self._by_id.pop(migration_id, None)
        if inc is None:
            return False
        self.scheduler.num_reserved_seqs -= 1
        with inc.lock:
            inc.closed = True
        self._closing.append(inc)
        self._release_closed()
        return True

    def expire(self) -> list[str]:
        """Cancel reservations past their deadline (called between steps and while
        idle); returns their migration ids."""
        now = self.clock()
        expired = [mid for mid, inc in self._by_id.items() if inc.expires_at <= now]
        for mid in expired:
            self.cancel(mid)
        self._release_closed()
        return expired

    def _release_closed(self) -> None:
        still = []
        for inc in self._closing:
            with inc.lock:
                busy = inc.writers > 0
            if busy:
                still.append(inc)
            else:
                self.blocks.release(reversed(inc.block_ids))
        self._closing = still

    def _open(self, migration_id: str) -> _Incoming:
        inc = self._by_id.get(migration_id)
        if inc is None:
            raise HandoffError("unknown", f"no KV reservation for migration {migration_id!r} "
                                          f"(expired, cancelled or never made)")
        return inc
