"""The worker actor: one engine (rank 0 of its TP group), stepped in a background
thread, streaming typed events per request, and either end of a live migration.

Ray calls arrive on the actor's asyncio loop; the engine is touched only by the
stepping thread. Calls hand it commands (worker_commands.py) through a queue, and it
hands each step's events back with one `call_soon_threadsafe`. Events travel on
channels (channel.py): a router replica subscribes once and submits many requests
on its channel (`subscribe`, `submit`); `generate` is a channel of one request.

A request that arrives by migration has no channel until its router, told by the
source's Moved event, attaches to it here (`attach`); its events wait for that. If
the source died before its Moved reached the router, the router resumes the request
elsewhere from the tokens it has: here, that resubmission attaches to the request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from workers.channel import ENDS_HERE, Channel, ChannelClosed, coalesce
from workers.engine.handoff import MigratedRequest
from workers.engine.interface import make_engine
from workers.engine.outputs import StepOutput
from workers.events import (ACTOR_NAMESPACE, Event, Failed, Finished, Moved, TokenLogprob, Tokens, Usage,
                            WorkerRequest, worker_actor_name)
from workers.expert_stats import WINDOW_S, ExpertStatistics
from workers.experts.policies import PlacementShape, place_experts
from workers.kv_transport import KVPayload, ObjectStoreTransport
from workers.load_report import LoadReport, kv_group_of, load_report
from workers.metrics import WorkerMetrics
from workers.migration import (MigrationOffer, MigrationOrder, MigrationResult, SourceMigration, SourceSettings,
                               kv_layout)
from workers.recompute_move import HandoverSettings, move_by_recompute
from workers.worker_commands import (AbortRequest, AddRequest, CancelMigration, Call, Command, CommitMigration,
                                     EngineCall, GrowReservation, ReplaceExperts, ReserveMigration)
from workers.worker_config import WorkerConfig

__all__ = ["ChannelClosed", "Worker", "WorkerConfig"]

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how long the stepping thread sleeps with nothing to do
_REPORT_INTERVAL_S = 0.02  # load report and metrics refresh, while busy
_IDLE_REPORT_INTERVAL_S = 1.0  # ... and while idle
# The cached block hashes in it, while busy: walking thousands of cached chains takes
# milliseconds, and the manager polls reports every load_poll_interval_s (0.5 s).
_HASHES_INTERVAL_S = 0.25
_CLOSED_CHANNELS_KEPT = 1024  # remembered so a late submit on one fails instead of leaking
_MOVED_KEPT = 4096  # requests moved away, remembered so a late abort follows them
_ABANDONED_KEPT = 1024  # moves by recompute given up by their source, for an adopt that comes late
_HANDOFF_RETRY_S = 0.05  # a decode worker without room is asked again after this long
_HANDOFF_RESTARTS = 3  # a handoff whose request was preempted (to be recomputed here) starts again this often
_HANDOFFS_KEPT = 256  # the latest handoff results, for `recent_handoffs`


@dataclass(slots=True)
class _Incoming:
    """A migration into this worker, before its commit."""

    request_id: str
    source_id: str
    reserved_blocks: int


@dataclass(slots=True)
class _Parked:
    """Events of a request moved here, kept until its router attaches."""

    deadline: float
    token_ids: tuple[int, ...]  # its prompt, then its output, as it arrived
    num_prompt_tokens: int
    events: list[Event] = field(default_factory=list)
    move_id: Optional[str] = None  # the move by recompute that brought it (see abandon)

    def resumes(self, request: WorkerRequest) -> bool:
        """`request` is this one resumed where it left its source: its source died
        after the move, before the Moved event reached the router (see _admit)."""
        return (len(request.prompt_token_ids) == self.num_prompt_tokens
                and request.prompt_token_ids + request.resume_token_ids == self.token_ids)

    def resumes_short(self, request: WorkerRequest) -> bool:
        """... but the router had fewer of its output tokens than the source made."""
        known = request.prompt_token_ids + request.resume_token_ids
        return (len(request.prompt_token_ids) == self.num_prompt_tokens and len(known) < len(self.token_ids)
                and self.token_ids[:len(known)] == known)


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine = make_engine(config.engine)
        self.capabilities = self.engine.capabilities
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._channels: dict[str, Channel] = {}  # channel id → its open stream
        self._channel_of: dict[str, Channel] = {}  # running request id → its channel
        self._admitted: dict[str, WorkerRequest] = {}  # running request id → as it came (to move by recompute)
        self._closed_channels: dict[str, None] = {}  # recent ones, oldest first
        self._generate_ids = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._draining = False
        self._thread_error: Optional[str] = None  # why the stepping thread died
        # Live migration.
        # Two worker actors are two processes, often on two nodes: the object store.
        self._transport = ObjectStoreTransport()
        self._layout = kv_layout(self.engine) if self.capabilities.kv_migration else None
        self._kv_group = kv_group_of(self.capabilities.backend, self._layout if self.capabilities.kv_migration
                                     else self.engine.handover_layout())
        self._outgoing: collections.Counter[str] = collections.Counter()  # request id → migrations out running
        self._incoming: dict[str, _Incoming] = {}  # migration id → before its commit
        self._parked: dict[str, _Parked] = {}  # request id → moved here, no router yet
        self._arrived_paused_at: dict[str, float] = {}  # request id → its pause at the source (wall)
        self._moved_to: collections.OrderedDict[str, Any] = collections.OrderedDict()  # request id → handle
        # Moves by recompute abandoned before their adopt call ran here (see abandon).
        self._abandoned: collections.OrderedDict[str, bool] = collections.OrderedDict()
        # Moves with KV handover: parts of the KV copied ahead, by migration id, with
        # the time after which they are dropped if no adopt comes.
        self._prestaged: dict[str, tuple[float, list[Any]]] = {}
        # Prefill/decode: handoffs run from admission; the first token's time (engine
        # clock, set on the stepping thread) starts the transfer phase.
        self._handing_off: set[str] = set()
        self._first_token_at: dict[str, float] = {}
        self._handoff_ids = itertools.count()
        self._handoff_tasks: set[asyncio.Future] = set()
        self._decode_workers: dict[str, Any] = {}  # decode worker id → actor handle
        self._handoff_results: collections.deque[MigrationResult] = collections.deque(maxlen=_HANDOFFS_KEPT)
        self._after_step: list[Call] = []  # calls held until the engine steps again
        self._before_forward: list[Call] = []  # calls held until the next step's batch is planned
        self._node_ip = _node_ip()
        self._load = self._build_report()
        self._metrics = WorkerMetrics(config.worker_id, config.engine.model, config.role)
        self._experts = (ExpertStatistics.of(self.engine.runner.model, self._metrics, self.engine.expert_moves)
                         if self.capabilities.expert_placement else None)
        self._replaced_at_step = 0  # with expert_replacement_every_steps: the last automatic one's step
        self._reported_at = 0.0
        self._hashes_at = 0.0

    # -- calls from routers -----------------------------------------------------------------
    async def generate(self, request: WorkerRequest) -> AsyncIterator[list[Event]]:
        """Stream one request's events, in batches; the last batch ends with Finished,
        Failed or Moved. If the caller goes away, the request is aborted."""
        channel = self._open_channel(f"generate-{next(self._generate_ids)}")
        self._admit(channel, request)
        try:
            ended = False
            while not ended:
                batch = coalesce(await channel.next_batch())
                ended = isinstance(batch[-1], ENDS_HERE)
                yield batch
        finally:
            self._close_channel(channel)

    async def subscribe(self, channel_id: str) -> AsyncIterator[list[Event]]:
        """One stream for every request `submit`ted (or `attach`ed) on `channel_id`,
        for as long as the caller listens: a router replica keeps one per worker, so a
        decode step costs one message for all its requests instead of one per request.
        When the caller goes away, its requests are aborted."""
        channel = self._open_channel(channel_id)
        try:
            while True:
                yield coalesce(await channel.next_batch())
        finally:
            self._close_channel(channel)

    async def submit(self, channel_id: str, request: WorkerRequest) -> None:
        """Start `request`; its events go out on `channel_id`'s `subscribe` stream."""
        self._admit(self._channel_for_call(channel_id), request)

    async def attach(self, channel_id: str, request_id: str) -> None:
        """Follow a request that moved here: its events so far, then the rest, go out
        on `channel_id`. Fails the request with `not_here` if it is not here."""
        channel = self._channel_for_call(channel_id)
        self._reap_parked()
        if request_id not in self._parked:
            channel.deliver(Failed(request_id, "not_here",
                                   f"request {request_id!r} is not on worker {self.config.worker_id}"))
            return
        self._attach_parked(channel, request_id)

    def _attach_parked(self, channel: Channel, request_id: str) -> None:
        parked = self._parked.pop(request_id)
        if not any(isinstance(e, ENDS_HERE) for e in parked.events):
            channel.requests.add(request_id)
            self._channel_of[request_id] = channel
        for event in parked.events:
            channel.deliver(event)

    def _channel_for_call(self, channel_id: str) -> Channel:
        channel = self._channels.get(channel_id)
        if channel is None:
            if channel_id in self._closed_channels:
                raise ChannelClosed(f"channel {channel_id!r} is closed on worker {self.config.worker_id}")
            channel = self._open_channel(channel_id)  # the subscribe call is still on its way
        return channel

    def _admit(self, channel: Channel, request: WorkerRequest) -> None:
        self._ensure_thread()
        rid = request.request_id
        refusal = None
        parked = self._parked.get(rid)
        if parked is not None and parked.resumes(request):
            self._attach_parked(channel, rid)
            return
        if parked is not None and parked.resumes_short(request):
            self._drop_parked(rid)
            refusal = Failed(rid, "not_here", f"request {rid!r} moved to worker {self.config.worker_id} with "
                                              f"{len(parked.token_ids) - parked.num_prompt_tokens} output tokens, "
                                              f"and was resumed with {len(request.resume_token_ids)}: dropped here")
        elif rid in self._channel_of or parked is not None:
            refusal = Failed(rid, "invalid_request", f"request_id {rid!r} is already running here")
        elif self._draining or not self.health()[0]:
            code = "draining" if self._draining else "worker_unhealthy"
            refusal = Failed(rid, code, f"worker {self.config.worker_id} is not taking requests ({code})")
        if refusal is not None:
            channel.deliver(refusal)
            return
        channel.requests.add(rid)
        self._channel_of[rid] = channel
        if request.arrival_time is None:  # FCFS order is by arrival at the router, kept across moves
            request = _with_arrival(request, time.time())
        self._admitted[rid] = request
        self._send(AddRequest(request))
        # A request that ends with its first token has nothing to decode elsewhere.
        last_token_here = len(request.resume_token_ids) + 1 >= request.params.max_tokens
        if request.handoff_to is not None and self.config.role == "prefill" and not last_token_here:
            self._start_handoff(rid, request.handoff_to)

    def _open_channel(self, channel_id: str) -> Channel:
        channel = self._channels.get(channel_id)
        if channel is None:
            channel = self._channels[channel_id] = Channel(channel_id, self.config.stream_interval_s,
                                                           self.config.stream_full_at,
                                                           self.config.stream_interval_max_s)
        return channel

    def _close_channel(self, channel: Channel) -> None:
        """The listener is gone: abort what is still running on the channel."""
        self._channels.pop(channel.channel_id, None)
        self._closed_channels[channel.channel_id] = None
        while len(self._closed_channels) > _CLOSED_CHANNELS_KEPT:
            self._closed_channels.pop(next(iter(self._closed_channels)))
        for rid in channel.requests:
            if self._channel_of.pop(rid, None) is not None:
                self.abort(rid)
        channel.requests.clear()

    def abort(self, request_id: str) -> None:
        """Stop a request; one that moved away is followed to where it went."""
        moved_to = self._moved_to.get(request_id)
        if moved_to is not None:
            moved_to.abort.remote(request_id)
        else:
            self._send(AbortRequest(request_id))

    def load(self) -> LoadReport:
        """The latest load report, refreshed by the stepping thread every 20 ms while
        busy (its cached block hashes every 0.25 s) and whenever it falls idle."""
        self._reap_parked()
        self._reap_incoming()
        if self._thread is None and self.engine.healthy:
            # No request yet, so no stepping thread whose idle check would notice a
            # rank or an attention worker that died: check here (nothing to fail).
            self.engine.check_helpers()
            self._load = dataclasses.replace(self._load, healthy=self.engine.healthy)
        return self._load

    def experts(self) -> dict[str, Any]:
        """The routing statistics of the last minute (workers/expert_stats.py)."""
        if self._experts is None:
            raise ValueError(f"worker {self.config.worker_id}'s model ({self.engine.model_config.architecture}) "
                             f"has no experts")
        return {"worker": self.config.worker_id, **self._experts.snapshot()}

    async def replace_experts(self, policy: Optional[str] = None) -> dict[str, Any]:
        """Re-place the experts by `policy` (the config's when None) from the last
        minute's routing statistics; answers once the move has begun (`experts` shows
        it moving, then its result)."""
        moves = self.engine.expert_moves
        if self._experts is None or moves is None:
            raise ValueError(f"worker {self.config.worker_id} runs without expert parallelism: there is no "
                             f"placement to replace")
        policy = policy or self.config.engine.expert_replacement_policy
        stats = self._experts.window.total
        if not any(map(any, stats.loads)):
            raise ValueError(f"worker {self.config.worker_id} has no routing statistics from the last "
                             f"{WINDOW_S:g} s to place its experts by")
        shape = PlacementShape(moves.table.num_ranks, moves.table.slots_per_rank)
        # The integer program may take seconds: off the actor's loop and the stepping thread.
        table = await asyncio.to_thread(place_experts, policy, stats, shape)
        await self._call(ReplaceExperts(table))
        return {"worker": self.config.worker_id, "policy": policy, "table": table.to_dict()}

    def health(self) -> tuple[bool, str]:
        if self._thread_error is not None or (self._thread is not None and not self._thread.is_alive()):
            return False, self._thread_error or "the stepping thread died"
        if not self.engine.healthy:
            return False, self.engine.health_error or "unhealthy"
        return True, "ok"

    def set_draining(self, draining: bool = True) -> None:
        """A draining worker takes no new request (routers retry elsewhere) and no
        incoming migration; the manager moves its requests out."""
        self._draining = draining
        self._load = dataclasses.replace(self._load, draining=draining)  # at once, even while idle

    async def drain(self, timeout_s: float = 60.0) -> int:
        """Refuse new requests and wait for the running ones; returns how many remain."""
        self.set_draining()
        deadline = time.monotonic() + timeout_s
        while (self._channel_of or self._parked) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(self._channel_of) + len(self._parked)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.shutdown()

    # -- live migration, source side -----------------------------------------------------------
    async def migrate(self, order: MigrationOrder) -> MigrationResult:
        """Move a request to order.destination with its KV (workers/migration.py); the
        request's router follows it there through the Moved event."""
        if not self.capabilities.kv_migration:
            return await self._move_by_recompute(order)
        self._ensure_thread()
        self._outgoing[order.request_id] += 1
        try:
            c = self.config
            settings = SourceSettings(c.migration_pause_blocks, c.migration_max_stages, c.migration_call_timeout_s,
                                      c.handoff_streaming, c.handoff_stream_unit)
            result = await SourceMigration(order, c.worker_id, self._layout, self.engine, self._transport,
                                           self._call, self._moved, settings).run()
            self._metrics.observe_transfer(result)
            return result
        finally:
            self._outgoing[order.request_id] -= 1
            if not self._outgoing[order.request_id]:
                del self._outgoing[order.request_id]

    async def _move_by_recompute(self, order: MigrationOrder) -> MigrationResult:
        """An engine that cannot move KV moves a request by recompute
        (workers/recompute_move.py), if its kind allows."""
        request = self._admitted.get(order.request_id)
        if request is None or order.request_id in self._outgoing:  # it ended, or left: as yard's StartMigration
            return MigrationResult(order.migration_id, order.request_id, self.config.worker_id, order.destination_id,
                                   order.reason, "aborted",
                                   f"not_here: request {order.request_id!r} is not running on {self.config.worker_id}"
                                   f" (or is already moving)")
        self._outgoing[order.request_id] += 1
        try:
            c = self.config
            handover = HandoverSettings(self.engine.handover_layout(), c.migration_pause_blocks,
                                        c.migration_max_stages)
            result = await move_by_recompute(order, c.worker_id, request, self._call,
                                             lambda r, kv: self._send(AddRequest(r, kv)), self._moved,
                                             c.migration_call_timeout_s, handover)
        finally:
            del self._outgoing[order.request_id]
        self._metrics.observe_transfer(result)
        return result

    async def handover_layout(self) -> Any:
        """The KV layout a request moved here by recompute may bring along (two vLLM
        workers alike), or None: it is computed here from its tokens."""
        return self.engine.handover_layout()

    async def prestage_kv(self, migration_id: str, part: Any) -> None:
        """Destination of a move with KV handover: a part of the request's KV, copied
        while it still decodes at the source; kept for its adopt call."""
        self._reap_prestaged()
        if self._abandoned.get(migration_id):
            raise ValueError(f"move {migration_id!r} was abandoned")
        _, parts = self._prestaged.setdefault(
            migration_id, (time.monotonic() + self.config.migration_attach_timeout_s, []))
        parts.append(part)

    def _reap_prestaged(self) -> None:
        now = time.monotonic()
        for mid in [m for m, (deadline, _) in self._prestaged.items() if deadline <= now]:
            del self._prestaged[mid]

    async def adopt(self, request: WorkerRequest, source_id: str, migration_id: str, kv: Any = None) -> None:
        """Destination of a move by recompute: compute `request` (prompt + the tokens
        already sent) here, or with its KV (`kv`, after any parts pre-copied here)
        only its last token; its events wait for its router to attach, as after a
        live migration. Raises ValueError if this worker cannot take it."""
        rid = request.request_id
        _, parts = self._prestaged.pop(migration_id, (None, []))
        if parts:
            from workers.vllm.kv_handover import kv_parts  # parts come only between vLLM workers

            kv = kv_parts(parts + ([kv] if kv is not None else []))
        # From here on nothing awaits: an abandon call runs before this or after it.
        if self._abandoned.pop(migration_id, False):
            raise ValueError(f"move {migration_id!r} of request {rid!r} was abandoned by {source_id}")
        if self._draining or not self.health()[0]:
            raise ValueError(f"worker {self.config.worker_id} is not taking requests from {source_id} "
                             f"({'draining' if self._draining else 'unhealthy'})")
        if rid in self._channel_of or rid in self._parked:
            raise ValueError(f"request {rid!r} is already on worker {self.config.worker_id}")
        self._ensure_thread()
        self._parked[rid] = _Parked(time.monotonic() + self.config.migration_attach_timeout_s,
                                    request.prompt_token_ids + request.resume_token_ids,
                                    len(request.prompt_token_ids), move_id=migration_id)
        self._moved_to.pop(rid, None)  # back here after moving away: aborts apply here again
        self._admitted[rid] = request
        self._send(AddRequest(request, kv))

    async def abandon(self, request_id: str, migration_id: str) -> None:
        """The source of a move by recompute gave up waiting for adopt and took the
        request back: drop it here if that adopt landed, or refuse it if it has not
        yet (Ray does not promise to run an async actor's calls in order)."""
        self._prestaged.pop(migration_id, None)
        parked = self._parked.get(request_id)
        if parked is not None and parked.move_id == migration_id:
            self._drop_parked(request_id)
            return
        self._abandoned[migration_id] = True
        while len(self._abandoned) > _ABANDONED_KEPT:
            self._abandoned.popitem(last=False)

    def _no_kv_migration(self) -> str:
        return (f"worker {self.config.worker_id}'s engine ({self.capabilities.backend}) cannot move a request's KV "
                f"cache in or out")

    def _moved(self, order: MigrationOrder, next_index: int) -> None:
        """Committed at the destination: the router follows the request there, and so
        does any abort that comes here late."""
        self._moved_to[order.request_id] = order.destination
        while len(self._moved_to) > _MOVED_KEPT:
            self._moved_to.popitem(last=False)
        self._deliver([Moved(order.request_id, order.destination_id, next_index)])

    # -- live migration, destination side ------------------------------------------------------
    async def accept_migration(self, offer: MigrationOffer) -> None:
        """Reserve room for a request the source is about to copy here. Raises
        ValueError, naming what differs, if its KV cannot fit this instance as it is."""
        if not self.capabilities.kv_migration:
            raise ValueError(self._no_kv_migration())
        mismatch = self._layout.mismatch(offer.layout)
        if mismatch is not None:
            raise ValueError(f"worker {self.config.worker_id} cannot take KV from {offer.source_id}: {mismatch}")
        if self._draining or not self.health()[0]:
            raise ValueError(f"worker {self.config.worker_id} is not taking migrations "
                             f"({'draining' if self._draining else 'unhealthy'})")
        if offer.request_id in self._channel_of or offer.request_id in self._parked:
            raise ValueError(f"request {offer.request_id!r} is already on worker {self.config.worker_id}")
        self._ensure_thread()
        blocks = await self._call(ReserveMigration(offer.migration_id, offer.request_id, offer.num_tokens))
        self._incoming[offer.migration_id] = _Incoming(offer.request_id, offer.source_id, len(blocks))
        self._note_incoming()

    async def receive_kv(self, migration_id: str, first_block: int, payload: KVPayload) -> None:
        """Write a stage of blocks, growing the reservation first if the request grew."""
        incoming = self._incoming.get(migration_id)
        if incoming is None:
            raise ValueError(f"no migration {migration_id!r} into worker {self.config.worker_id}")
        end = first_block + payload.num_blocks
        if end > incoming.reserved_blocks:
            blocks = await self._call(GrowReservation(migration_id, end * self.engine.blocks.block_size))
            incoming.reserved_blocks = len(blocks)
        await asyncio.to_thread(self._transport.receive, self.engine, migration_id, first_block, payload)

    async def commit_migration(self, migration_id: str, state: MigratedRequest, paused_at: float) -> None:
        """Start decoding the request here; its events wait for its router to attach."""
        incoming = self._incoming.pop(migration_id, None)
        if incoming is None:
            raise ValueError(f"no migration {migration_id!r} into worker {self.config.worker_id}")
        rid = state.request_id
        if rid in self._channel_of or rid in self._parked:  # its router resumed it here already
            await self._call(CancelMigration(migration_id))
            raise ValueError(f"request {rid!r} is already on worker {self.config.worker_id}")
        # Parked before the commit runs, so that no event of it is dropped.
        self._parked[rid] = _Parked(time.monotonic() + self.config.migration_attach_timeout_s, state.token_ids,
                                    state.num_prompt_tokens)
        self._moved_to.pop(rid, None)  # back here after moving away: aborts apply here again
        self._arrived_paused_at[rid] = paused_at
        try:
            await self._call(CommitMigration(migration_id, state))
        except BaseException:
            self._parked.pop(rid, None)
            self._arrived_paused_at.pop(rid, None)
            raise

    async def cancel_migration(self, migration_id: str) -> None:
        self._incoming.pop(migration_id, None)
        self._note_incoming()
        await self._call(CancelMigration(migration_id))

    def _note_incoming(self) -> None:
        """The load report says at once how many migrations are coming in, even while idle."""
        self._load = dataclasses.replace(self._load, migrations_in=len(self._incoming))

    def _reap_incoming(self) -> None:
        """Forget migrations whose reservation expired (their source gave up or died
        without a cancel), so that they no longer count as migrations in flight."""
        expired = [m for m in self._incoming if not self.engine.destination.holds(m)]
        for mid in expired:
            del self._incoming[mid]
        if expired:
            self._note_incoming()

    def _reap_parked(self) -> None:
        """Requests moved here whose router never attached (it went away) are aborted."""
        now = time.monotonic()
        for rid in [r for r, p in self._parked.items() if p.deadline <= now]:
            self._drop_parked(rid)

    def _drop_parked(self, request_id: str) -> None:
        parked = self._parked.pop(request_id)
        if not any(isinstance(e, ENDS_HERE) for e in parked.events):
            self._send(AbortRequest(request_id))

    # -- the stepping thread ------------------------------------------------------------------
    async def _call(self, command: EngineCall, after_step: Optional[int] = None, before_forward: bool = False) -> Any:
        """Run one engine call on the stepping thread, between two steps (with
        after_step: not before the engine's step count exceeds it; with
        before_forward: inside the next step, before its forward)."""
        self._ensure_thread()
        if self._thread_error is not None:
            raise RuntimeError(self._thread_error)
        call = Call(command, after_step=after_step, before_forward=before_forward)
        self._send(call)
        return await asyncio.wrap_future(call.reply)

    def _send(self, command: Command) -> None:
        self._commands.put(command)
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.config.worker_id}",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._step_until_stopped()
        except BaseException as e:  # noqa: BLE001 - whatever ends the thread, no request may hang
            self._stepping_died(f"the stepping thread died: {type(e).__name__}: {e}")
            raise

    def _stepping_died(self, error: str) -> None:
        """Still on the dying thread: end every request with a retriable error (routers
        resume them elsewhere) and report unhealthy, so the manager replaces the worker."""
        self._thread_error = error
        try:
            failed = [e for output in self.engine.fail(error) for e in self._events_of(output)]
        except BaseException:  # noqa: BLE001 - the engine's state is unknown; the loop fails the rest
            failed = []
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_everything, failed, error)

    def _fail_everything(self, failed: list[Event], error: str) -> None:
        self._load = dataclasses.replace(self._load, healthy=False)
        self._deliver(failed)
        rids = set(self._channel_of) | set(self._parked)
        self._deliver([Failed(rid, "worker_unhealthy", error) for rid in rids])
        held, self._after_step, self._before_forward = self._after_step + self._before_forward, [], []
        while not self._commands.empty():  # calls queued or held for the thread get the error
            held.append(self._commands.get_nowait())
        for command in held:
            if isinstance(command, Call) and command.reply.set_running_or_notify_cancel():
                command.reply.set_exception(RuntimeError(error))

    def _step_until_stopped(self) -> None:
        engine = self.engine
        while not self._stopping:
            applied = self._apply_commands()
            if engine.has_unfinished_requests():
                start = time.perf_counter()
                self._emit([e for output in self._step() for e in self._events_of(output)])
                self._metrics.step_time.observe(time.perf_counter() - start, self._metrics.tags)
                self._answer_after_step(idle=False)
                # The report copies up to max_cached_hashes hashes: refresh it every few
                # steps, and always when the worker falls idle, not on every token.
                if start - self._reported_at >= _REPORT_INTERVAL_S or not engine.has_unfinished_requests():
                    self._report(start, hashes=start - self._hashes_at >= _HASHES_INTERVAL_S
                                 or not engine.has_unfinished_requests())
                if engine.stepped:
                    continue
            elif engine.expert_moves is not None and engine.expert_moves.moving:
                # An expert re-placement goes on while idle, a layer at a time.
                self._emit([e for output in engine.advance_expert_move() for e in self._events_of(output)])
                continue
            else:
                # A reservation must not outlive its deadline while idle; a command (a
                # migration's end) may have changed the load: report it. An idle
                # worker reports now and then too, so a report's age says whether the
                # stepping thread still runs.
                now = time.perf_counter()
                due = now - self._reported_at >= _IDLE_REPORT_INTERVAL_S
                if due:  # a rank or an attention worker can die while idle too: fail now, not at the next request
                    self._emit([e for output in engine.check_helpers() for e in self._events_of(output)])
                if engine.expire_reservations() or applied or due:
                    self._report(now)
            # Nothing to run (idle, or only requests paused for a migration).
            self._answer_after_step(idle=True)
            self._wake.wait(_IDLE_WAIT_S)
            self._wake.clear()

    def _answer_after_step(self, idle: bool) -> None:
        if idle:
            self._answer_before_forward()
        if not self._after_step:
            return
        steps = self.engine.num_steps
        due = [c for c in self._after_step if idle or steps > c.after_step]
        self._after_step = [c for c in self._after_step if not (idle or steps > c.after_step)]
        for call in due:
            self._answer(call)

    def _answer_before_forward(self) -> None:
        due, self._before_forward = self._before_forward, []
        for call in due:
            self._answer(call)

    def _step(self) -> list[StepOutput]:
        """One engine step. An error the engine did not expect (a kernel's out of
        memory, a device error) leaves it in an unknown state: every request fails
        with a retriable code, so routers resume them elsewhere, and the worker
        reports itself unhealthy until it is replaced."""
        try:
            return self.engine.step(self._answer_before_forward if self._before_forward else None)
        except Exception as e:  # noqa: BLE001 - see above
            return self.engine.fail(f"engine step failed: {type(e).__name__}: {e}")

    def _report(self, now: float, hashes: bool = True) -> None:
        self._load = self._build_report(hashes)
        if hashes:
            self._hashes_at = now
        self._metrics.update(self.engine.stats())
        offload = self.engine.offload_stats()
        if offload is not None:
            self._metrics.offload(offload)
        if self._experts is not None:
            self._experts.maybe_take(now)
            self._maybe_replace_experts()
        self._reported_at = now

    def _maybe_replace_experts(self) -> None:
        """With expert_replacement_every_steps: a re-placement from the statistics
        once that many steps have run since the last one."""
        every, moves = self.config.engine.expert_replacement_every_steps, self.engine.expert_moves
        if not every or moves is None or moves.moving or self._loop is None:
            return
        due = self.engine.num_steps - self._replaced_at_step >= every
        if not due or not any(map(any, self._experts.window.total.loads)):
            return  # not yet due, or no statistics taken yet to place by
        self._replaced_at_step = self.engine.num_steps
        future = asyncio.run_coroutine_threadsafe(self.replace_experts(), self._loop)
        future.add_done_callback(_log_replacement_error)

    def _build_report(self, hashes: bool = True) -> LoadReport:
        """hashes=False keeps the last report's cached block hashes."""
        return load_report(self.engine, self.config.worker_id, self.config.role, self.config.max_cached_hashes,
                           draining=self._draining, migrating_out=frozenset(self._outgoing),
                           migrations_in=len(self._incoming), node_ip=self._node_ip,
                           hashes=None if hashes else self._load.cached_block_hashes, pool=self.config.pool,
                           kv_group=self._kv_group)

    def _apply_commands(self) -> int:
        applied = 0
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied += 1
            if isinstance(command, AddRequest):
                self._add(command.request, command.kv)
            elif isinstance(command, AbortRequest):
                self.engine.abort(command.request_id)
            elif command.after_step is not None and self.engine.num_steps <= command.after_step:
                self._after_step.append(command)
            elif command.before_forward:
                self._before_forward.append(command)
            else:
                self._answer(command)

    def _answer(self, call: Call) -> None:
        if not call.reply.set_running_or_notify_cancel():
            return
        try:
            call.reply.set_result(call.command.apply(self.engine))
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            call.reply.set_exception(e)

    def _add(self, r: WorkerRequest, kv: Any = None) -> None:
        extra = {} if kv is None else {"kv": kv}  # only engines with a handover layout take KV
        try:
            self.engine.add_request(r.request_id, r.prompt_token_ids, r.params, priority=r.priority,
                                    arrival_time=r.arrival_time, output_token_ids=r.resume_token_ids, **extra)
        except (ValueError, TypeError, RuntimeError) as e:
            code = "worker_unhealthy" if isinstance(e, RuntimeError) else "invalid_request"
            self._emit([Failed(r.request_id, code, str(e))])

    def _events_of(self, out: StepOutput) -> list[Event]:
        if out.timing is not None:
            self._observe_phases(out)
        events: list[Event] = []
        if out.new_token_ids:
            logprobs = None if out.new_logprobs is None else tuple(
                TokenLogprob(t.token_id, t.logprob, t.top_logprobs or ()) for t in out.new_logprobs)
            events.append(Tokens(out.request_id, out.start_index, out.new_token_ids, out.new_text, logprobs))
        if out.finish_reason == "error":
            events.append(Failed(out.request_id, "worker_unhealthy", out.error or "engine failure"))
        elif out.finished:
            usage = Usage(out.num_prompt_tokens, out.start_index + len(out.new_token_ids), out.num_cached_tokens)
            events.append(Finished(out.request_id, out.finish_reason, out.stop_reason, usage))
        return events

    def _emit(self, events: list[Event]) -> None:
        """Hand a step's events to the actor's loop: one wake-up for all of them."""
        if events and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            rid = event.request_id
            if isinstance(event, ENDS_HERE):
                self._admitted.pop(rid, None)
            if rid in self._arrived_paused_at and isinstance(event, (Tokens, *ENDS_HERE)):
                paused_at = self._arrived_paused_at.pop(rid)
                if isinstance(event, Tokens):
                    self._metrics.migration_downtime.observe(time.time() - paused_at, self._metrics.tags)
            channel = self._channel_of.get(rid)
            if channel is None:
                parked = self._parked.get(rid)
                if parked is not None:
                    parked.events.append(event)
                continue  # otherwise aborted because its listener went away
            if isinstance(event, ENDS_HERE):
                del self._channel_of[rid]
                channel.requests.discard(rid)
            channel.deliver(event)

    # -- prefill/decode disaggregation, prefill side ------------------------------------------
    def _start_handoff(self, request_id: str, decode_id: str) -> None:
        self._handing_off.add(request_id)
        task = asyncio.ensure_future(self._hand_off(request_id, decode_id))
        self._handoff_tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._handoff_tasks.discard)

    async def _hand_off(self, request_id: str, decode_id: str) -> MigrationResult:
        """Move a request, admitted here, to its decode worker, KV and all, as a live
        migration that streams the prompt's KV while it computes and pauses once the
        first token is out. A decode worker without room is asked again for
        handoff_wait_s; a request preempted here (its prompt to be computed again) is
        handed off again as it recomputes. If the handoff fails, the request goes on here."""
        try:
            deadline = time.monotonic() + self.config.handoff_wait_s
            restarts = 0
            while True:
                result = await self._try_handoff(request_id, decode_id)
                error = result.error or ""
                if request_id not in self._channel_of:
                    break
                if error.startswith("preempted") and restarts < _HANDOFF_RESTARTS:
                    restarts += 1
                    continue
                if not (error.startswith("no_room") and time.monotonic() < deadline):
                    break
                await asyncio.sleep(_HANDOFF_RETRY_S)
        finally:
            self._handing_off.discard(request_id)
            first_token_at = self._first_token_at.pop(request_id, None)
        if result.committed_at is not None and first_token_at is not None:
            # Both on time.monotonic (the worker's engine keeps the default clock).
            self._metrics.observe_phase("transfer", result.committed_at - first_token_at)
        self._metrics.handoffs.inc(1, {**self._metrics.tags, "outcome": result.outcome})
        self._handoff_results.append(result)
        if result.outcome != "committed" and request_id in self._channel_of:
            # Never silent: the request decodes on here, and the log says why.
            log.warning("handoff of %s to %s %s (%s); it goes on here", request_id, decode_id, result.outcome,
                        result.error)
        return result

    def phase_totals(self) -> dict[str, tuple[int, float]]:
        """(count, seconds) since the worker started, per latency phase (metrics.PHASES)
        and per KV copy kind (kv_copy_<reason>, and kv_copy_hidden_<reason>: the part
        spent while the prompt still computed): what benchmarks difference."""
        return dict(self._metrics.totals)

    def recent_handoffs(self) -> list[MigrationResult]:
        """The latest handoffs this prefill worker made, oldest first (the last attempt of each)."""
        return list(self._handoff_results)

    async def _try_handoff(self, request_id: str, decode_id: str) -> MigrationResult:
        mid = f"{self.config.worker_id}-h{next(self._handoff_ids)}"
        try:
            destination = await self._decode_worker(decode_id)
        except ValueError as e:
            return MigrationResult(mid, request_id, self.config.worker_id, decode_id, "handoff", "failed",
                                   f"no_worker: no decode worker {decode_id}: {e}")
        result = await self.migrate(MigrationOrder(mid, request_id, decode_id, destination, "handoff"))
        if result.outcome == "failed":
            self._decode_workers.pop(decode_id, None)  # perhaps dead: look it up afresh next time
        return result

    async def _decode_worker(self, decode_id: str) -> Any:
        import ray

        handle = self._decode_workers.get(decode_id)
        if handle is None:
            handle = await asyncio.to_thread(ray.get_actor, worker_actor_name(decode_id), namespace=ACTOR_NAMESPACE)
            self._decode_workers[decode_id] = handle
        return handle

    def _observe_phases(self, out: StepOutput) -> None:
        """The per-phase latency breakdown (after DistServe), from the engine's times;
        on the stepping thread. A request prefilled here: prefill_queue, prefill, and
        (if it stays) decode; one that arrived with its KV: decode_queue and decode."""
        t, m = out.timing, self._metrics
        first = t.first
        if t.migrated_in:
            if first:
                m.observe_phase("decode_queue", t.queued_s)
            if out.finished:
                m.observe_phase("decode", t.now - t.first_scheduled_at)
            return
        if first:
            m.observe_phase("prefill_queue", t.queued_s)
            m.observe_phase("prefill", t.first_output_at - t.first_scheduled_at)
            if out.request_id in self._handing_off:
                self._first_token_at[out.request_id] = t.first_output_at
        if out.finished and t.now > t.first_output_at:
            m.observe_phase("decode", t.now - t.first_output_at)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else ""


def _with_arrival(request: WorkerRequest, arrival_time: float) -> WorkerRequest:
    return dataclasses.replace(request, arrival_time=arrival_time)


def _log_replacement_error(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("automatic expert re-placement not started: %s", future.exception())
