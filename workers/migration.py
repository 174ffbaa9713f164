"""Live migration between two worker actors: the messages, and the source's side of
the protocol (after Llumnix).

The source drives. The destination reserves blocks; the source copies the request's
full blocks stage after stage while it keeps decoding, until at most
`migration_pause_blocks` remain; it pauses the request between two steps, copies the
rest and the request's state; the destination commits and starts decoding; the
source emits Moved(to_worker, next_index) and frees its blocks. Before the commit
either side may give up, and the request then carries on at the source as if
nothing happened. The KV goes worker to worker through a KVTransport.

A prefill→decode handoff (reason "handoff") starts when the request is admitted and
pauses only once the first token is out. Before each forward of the prompt it takes
the blocks that forward fills, and sends them layer range by layer range as the
forward writes them, while the later layers compute (and the next forward, if the
send lags): when the first token is out, the KV is at the destination, and the pause
copies only the request's state. With streaming off (WorkerConfig.handoff_streaming),
it copies everything at that pause.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from workers.engine.handoff import HandoffError, MigrationStep
from workers.worker_commands import (AdvanceMigration, CompleteMigration, ResumeMigration, StartMigration,
                                     StreamMigration)

if TYPE_CHECKING:
    from workers.engine.engine import LLMEngine
    from workers.kv_transport import KVTransport

REASONS = ("balance", "defrag", "priority", "drain", "manual", "handoff")


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What must match for KV blocks to move between two instances as they are."""

    model: str
    dtype: str
    block_size: int
    tensor_parallel_size: int
    num_layers: int
    kv_heads: int  # per rank
    head_dim: int

    def mismatch(self, other: "KVLayout") -> Optional[str]:
        """None if KV from `other` fits here; else which field differs, with both values."""
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} differs: source has {theirs!r}, destination {mine!r}"
        return None


def kv_layout(engine: "LLMEngine") -> KVLayout:
    shape = engine.runner.kv_caches.shape  # layers, 2, blocks, block_size, kv heads, head_dim
    return KVLayout(engine.model_dir.name, str(engine.model_config.dtype).removeprefix("torch."),
                    engine.blocks.block_size, engine.config.tensor_parallel_size, shape[0], shape[4], shape[5])


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """How a source runs its migrations (from WorkerConfig)."""

    pause_blocks: int  # pre-copy stops once at most this many blocks are unsent
    max_stages: int  # pre-copy stages of a decoding request before it pauses anyway
    call_timeout_s: float  # a destination call slower than this fails the migration
    stream_prefill: bool = True  # a handoff streams the prompt's KV as it computes (else copies it after)
    stream_unit: str = "layer"  # what a streamed send waits for: each "layer" of a forward, or the "chunk"


class TransferTimeout(RuntimeError):
    reason = "timeout"


@dataclass(frozen=True, slots=True)
class MigrationOrder:
    """What the manager (or an operator) asks a source worker to do."""

    migration_id: str
    request_id: str
    destination_id: str
    destination: Any  # the destination's Worker actor handle
    reason: str = "manual"


@dataclass(frozen=True, slots=True)
class MigrationOffer:
    """Source → destination, before any KV: reserve room for this request."""

    migration_id: str
    request_id: str
    source_id: str
    layout: KVLayout
    num_tokens: int


@dataclass(frozen=True, slots=True)
class MigrationResult:
    migration_id: str
    request_id: str
    source_id: str
    destination_id: str
    reason: str
    outcome: str  # "committed", "aborted" (the request carries on at the source) or "failed"
    error: Optional[str] = None  # why it did not commit: a short code, then the message
    stages: int = 0  # copies made, the last (paused) one included
    blocks: int = 0
    bytes: int = 0
    copy_s: float = 0.0  # time spent sending and receiving KV (sends that overlap add up)
    prefill_copy_s: float = 0.0  # the part of copy_s spent before the pause (while the prompt computed)
    payloads: int = 0  # KV sends: one per stage, or one per layer range of a streamed stage
    paused_s: float = 0.0  # from the pause to the destination's commit
    next_index: Optional[int] = None  # where the destination continues (committed only)
    committed_at: Optional[float] = None  # time.monotonic() when the destination had committed

    @property
    def committed(self) -> bool:
        return self.outcome == "committed"


class SourceMigration:
    """One migration as the source runs it, on the source actor's event loop."""

    def __init__(self, order: MigrationOrder, source_id: str, layout: KVLayout, engine: "LLMEngine",
                 transport: "KVTransport", call: Callable[..., Awaitable[Any]],
                 moved: Callable[[MigrationOrder, int], None], settings: SourceSettings) -> None:
        self.order = order
        self.source_id = source_id
        self.layout = layout
        self.engine = engine
        self.transport = transport
        self.call = call  # (EngineCall, after_step=None): run it on the source's stepping thread
        self.moved = moved  # (order, next index): emit Moved
        self.pause_blocks = settings.pause_blocks
        self.max_stages = settings.max_stages
        self.call_timeout_s = settings.call_timeout_s
        self.stream_unit = settings.stream_unit
        self.hold = order.reason == "handoff"  # no pause before the first token
        self.during_prefill = ("stream" if settings.stream_prefill else "wait") if self.hold else "pause"
        self.stages = self.blocks = self.bytes = self.payloads = 0
        self.copy_s = self.prefill_copy_s = self.paused_s = 0.0
        self._paused_perf = float("inf")  # perf_counter() at the pause: sends before it were hidden
        self.committed_at: Optional[float] = None

    async def run(self) -> MigrationResult:
        o = self.order
        try:
            num_tokens = await self.call(StartMigration(o.migration_id, o.request_id))
        except HandoffError as e:
            return self._result("aborted", f"{e.reason}: {e}")
        committed = False
        try:
            if self.during_prefill == "stream":
                state, paused_at = await self._stream(num_tokens)
            else:
                # A handoff reserves room at the destination once the prefill is under
                # way, not while the request waits in the queue.
                first = await self._first_computed() if self.hold else None
                await self._accept(num_tokens)
                state, paused_at = await self._copy(first)
            # No timeout here: a commit that is slow may still land, and the request
            # must then not also resume at the source.
            await o.destination.commit_migration.remote(o.migration_id, state, paused_at)
            committed = True
            self.committed_at = time.monotonic()
            self.paused_s = time.time() - paused_at
            self.moved(o, state.next_index)
            await self._complete()
            return self._result("committed", next_index=state.next_index)
        except Exception as e:  # noqa: BLE001 - any failure before commit leaves the request here
            if committed:
                raise
            await self._abort()
            return self._result(*_outcome(e))

    async def _accept(self, num_tokens: int) -> None:
        o = self.order
        await self._remote("accept_migration", MigrationOffer(o.migration_id, o.request_id, self.source_id,
                                                              self.layout, num_tokens))

    async def _stream(self, num_tokens: int) -> tuple[Any, float]:
        """A streaming handoff: a round before each forward of the prompt, its blocks
        sent layer by layer while the forward runs (the destination reserves room at
        the first); after the forward that makes the first token, the pause. Returns
        the request's state and when it paused."""
        sends: list[asyncio.Future] = []
        accepted = False
        try:
            while True:
                step = await self.call(StreamMigration(self.order.migration_id), before_forward=True)
                if step.stage.block_ids:
                    if not accepted:
                        await self._accept(num_tokens)
                        accepted = True
                    sends.append(asyncio.ensure_future(self._send_layers(step.stage, step.forward_id)))
                if step.final_prefill or not step.in_prefill:
                    break
            if not accepted:
                await self._accept(num_tokens)
            # Right after that forward; later if this call comes late (the request then
            # decoded meanwhile, and the pause copies what it computed).
            pause = await self.call(AdvanceMigration(self.order.migration_id, 1 << 30, self.during_prefill),
                                    step.engine_step)
            paused_at, self._paused_perf = time.time(), time.perf_counter()
            await asyncio.gather(*sends)
            await self._send(pause.stage, in_prefill=False)
            return pause.state, paused_at
        finally:
            for send in sends:
                send.cancel()  # on failure; done by now otherwise

    async def _send_layers(self, stage: Any, forward_id: Optional[int]) -> None:
        """Send a stage whose blocks forward `forward_id` is filling: each time layers
        are done, the layers done since the last send go (more at once when the
        transfer lags the forward); with stream_unit "chunk", all once the forward is
        done. Without a forward, all layers at once."""
        if forward_id is None:
            await self._send(stage, in_prefill=True)
            return
        self.stages += 1
        self.blocks += len(stage.block_ids)
        sent, total = 0, self.layout.num_layers
        while sent < total:
            wanted = sent + 1 if self.stream_unit == "layer" else total
            done = await asyncio.to_thread(self.engine.wait_layers, forward_id, wanted, self.call_timeout_s)
            await self._send_payload(stage, (sent, done), forward_id, in_prefill=True)
            sent = done

    async def _first_computed(self) -> MigrationStep:
        """Wait, step by step, for the request's first full block (or its first token).
        Never a pause: the request decodes on until the destination has accepted (a
        retry after a full destination finds it decoding here)."""
        step = None
        while step is None or not (step.stage.block_ids or not step.in_prefill):
            step = await self._advance(-1, step)
        return step

    async def _advance(self, pause_at_blocks: int, previous: Optional[MigrationStep]) -> MigrationStep:
        """The next round. While the prompt computes, it is taken right after the
        engine's next step (at once if a step ran since `previous`): a new chunk's
        blocks, or the first token, are seen without a round trip's delay."""
        after = previous.engine_step if previous is not None and previous.in_prefill else None
        return await self.call(AdvanceMigration(self.order.migration_id, pause_at_blocks, self.during_prefill),
                               after)

    async def _copy(self, step: Optional[MigrationStep]) -> tuple[Any, float]:
        """Stages (from `step`, if one is already taken) until the pause; returns the
        request's state and when it paused."""
        decode_stages = 0  # max_stages bounds the chase of a decoding request, not a prefill
        previous = None
        while True:
            if step is None:
                # A handoff pauses as soon as the first token is out: what is left is
                # at most the last chunk's blocks.
                pause_now = self.hold or decode_stages + 1 >= self.max_stages
                step = await self._advance(1 << 30 if pause_now else self.pause_blocks, previous)
            paused_at = time.time() if step.paused else None
            if step.stage.block_ids or step.paused:
                await self._send(step.stage, step.in_prefill)
            decode_stages += not step.in_prefill
            if paused_at is not None:
                return step.state, paused_at
            previous, step = step, None

    async def _remote(self, method: str, *args: Any) -> Any:
        """Call the destination; a call that outlasts call_timeout_s (a stuck or
        partitioned destination) fails the migration, so the request never waits on it."""
        try:
            return await asyncio.wait_for(getattr(self.order.destination, method).remote(*args), self.call_timeout_s)
        except asyncio.TimeoutError:
            raise TransferTimeout(f"{method} on {self.order.destination_id} took over {self.call_timeout_s} s") \
                from None

    async def _send(self, stage: Any, in_prefill: bool) -> None:
        self.stages += 1
        if stage.block_ids:
            self.blocks += len(stage.block_ids)
            await self._send_payload(stage, None, None, in_prefill)

    async def _send_payload(self, stage: Any, layers: Optional[tuple[int, int]], forward_id: Optional[int],
                            in_prefill: bool) -> None:
        start = time.perf_counter()
        payload = await asyncio.to_thread(self.transport.send, self.engine, stage.block_ids, layers, forward_id)
        await self._remote("receive_kv", self.order.migration_id, stage.first_block, payload)
        self.bytes += payload.nbytes
        self.payloads += 1
        end = time.perf_counter()
        self.copy_s += end - start
        if in_prefill:  # a streamed send may end after the pause: that part was not hidden
            self.prefill_copy_s += max(0.0, min(end, self._paused_perf) - start)

    async def _complete(self) -> None:
        o = self.order
        try:
            await self.call(CompleteMigration(o.migration_id))
        except HandoffError:
            # The client went away while the last copy ran: the request now lives only
            # at the destination, and must end there too.
            o.destination.abort.remote(o.request_id)

    async def _abort(self) -> None:
        o = self.order
        try:
            o.destination.cancel_migration.remote(o.migration_id)  # fire and forget: it may be dead
        except Exception:  # noqa: BLE001
            pass
        await self.call(ResumeMigration(o.migration_id))

    def _result(self, outcome: str, error: Optional[str] = None, next_index: Optional[int] = None) -> MigrationResult:
        o = self.order
        return MigrationResult(o.migration_id, o.request_id, self.source_id, o.destination_id, o.reason, outcome,
                               error, self.stages, self.blocks, self.bytes, self.copy_s, self.prefill_copy_s,
                               self.payloads, self.paused_s, next_index, self.committed_at)


def _outcome(e: BaseException) -> tuple[str, str]:
    """("aborted", why) when a side refused or the request left (it carries on, or
    ended, normally); ("failed", why) when something broke (a worker died)."""
    cause = e
    # Ray wraps an exception raised in the destination's actor; the original says why.
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    refused = isinstance(cause, (HandoffError, ValueError))
    reason = getattr(cause, "reason", None) or type(cause).__name__
    return ("aborted" if refused else "failed"), f"{reason}: {cause}"
