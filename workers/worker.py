"""The worker actor: one engine (rank 0 of its TP group), stepped in a background
thread, streaming typed events per request.

Ray calls arrive on the actor's asyncio loop; the engine is touched only by the
stepping thread. Calls hand it commands through a queue, and it hands each step's
events back with one `call_soon_threadsafe`. Events travel on channels: a router
replica subscribes once and submits many requests on its channel (`subscribe`,
`submit`); `generate` is a channel of one request. A channel sends a request's first
and last events at once and the tokens in between at most every
`stream_interval_s`, all of its requests in one message, so a token does not cost an
actor round trip.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.outputs import StepOutput
from workers.events import Event, Failed, Finished, TokenLogprob, Tokens, Usage, WorkerRequest
from workers.load_report import LoadReport, load_report
from workers.metrics import WorkerMetrics

_IDLE_WAIT_S = 0.05  # how long the stepping thread sleeps with nothing to do
_REPORT_INTERVAL_S = 0.02  # load report and metrics refresh, while busy
_CLOSED_CHANNELS_KEPT = 1024  # remembered so a late submit on one fails instead of leaking


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    engine: EngineConfig
    role: str = "mixed"  # mixed, prefill or decode
    # A running request's tokens go out at most this often (its first and last at
    # once): fewer, larger messages through the router and the proxy.
    stream_interval_s: float = 0.05
    max_cached_hashes: int = 4096  # bound on the block hashes a load report carries

    def __post_init__(self) -> None:
        if self.role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role must be mixed, prefill or decode, got {self.role!r}")
        if not 0 <= self.stream_interval_s <= 1:
            raise ValueError(f"stream_interval_s must be in [0, 1], got {self.stream_interval_s}")


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine = LLMEngine(config.engine)
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._channels: dict[str, _Channel] = {}  # channel id → its open stream
        self._channel_of: dict[str, _Channel] = {}  # running request id → its channel
        self._closed_channels: dict[str, None] = {}  # recent ones, oldest first
        self._generate_ids = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._draining = False
        self._load = load_report(self.engine, config.worker_id, config.role, config.max_cached_hashes)
        self._metrics = WorkerMetrics(config.worker_id, config.engine.model)
        self._reported_at = 0.0

    # -- calls from routers -----------------------------------------------------------------
    async def generate(self, request: WorkerRequest) -> AsyncIterator[list[Event]]:
        """Stream one request's events, in batches; the last batch ends with Finished
        or Failed. If the caller goes away, the request is aborted."""
        channel = self._open_channel(f"generate-{next(self._generate_ids)}")
        self._admit(channel, request)
        try:
            ended = False
            while not ended:
                batch = _coalesce(await channel.next_batch())
                ended = isinstance(batch[-1], (Finished, Failed))
                yield batch
        finally:
            self._close_channel(channel)

    async def subscribe(self, channel_id: str) -> AsyncIterator[list[Event]]:
        """One stream for every request `submit`ted on `channel_id`, for as long as the
        caller listens: a router replica keeps one per worker, so a decode step costs
        one message for all its requests instead of one per request. When the caller
        goes away, its requests are aborted."""
        channel = self._open_channel(channel_id)
        try:
            while True:
                yield _coalesce(await channel.next_batch())
        finally:
            self._close_channel(channel)

    async def submit(self, channel_id: str, request: WorkerRequest) -> None:
        """Start `request`; its events go out on `channel_id`'s `subscribe` stream."""
        channel = self._channels.get(channel_id)
        if channel is None:
            if channel_id in self._closed_channels:
                raise ChannelClosed(f"channel {channel_id!r} is closed on worker {self.config.worker_id}")
            channel = self._open_channel(channel_id)  # the subscribe call is still on its way
        self._admit(channel, request)

    def _admit(self, channel: "_Channel", request: WorkerRequest) -> None:
        self._ensure_thread()
        rid = request.request_id
        refusal = None
        if rid in self._channel_of:
            refusal = Failed(rid, "invalid_request", f"request_id {rid!r} is already running here")
        elif self._draining or not self.engine.healthy:
            code = "draining" if self._draining else "worker_unhealthy"
            refusal = Failed(rid, code, f"worker {self.config.worker_id} is not taking requests ({code})")
        if refusal is not None:
            channel.deliver(refusal)
            return
        channel.requests.add(rid)
        self._channel_of[rid] = channel
        self._send(("add", request))

    def _open_channel(self, channel_id: str) -> "_Channel":
        channel = self._channels.get(channel_id)
        if channel is None:
            channel = self._channels[channel_id] = _Channel(channel_id, self.config.stream_interval_s)
        return channel

    def _close_channel(self, channel: "_Channel") -> None:
        """The listener is gone: abort what is still running on the channel."""
        self._channels.pop(channel.channel_id, None)
        self._closed_channels[channel.channel_id] = None
        while len(self._closed_channels) > _CLOSED_CHANNELS_KEPT:
            self._closed_channels.pop(next(iter(self._closed_channels)))
        for rid in channel.requests:
            if self._channel_of.pop(rid, None) is not None:
                self._send(("abort", rid))
        channel.requests.clear()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def load(self) -> LoadReport:
        """The latest load report, refreshed by the stepping thread after every step."""
        return self._load

    def health(self) -> tuple[bool, str]:
        if self._thread is not None and not self._thread.is_alive():
            return False, "the stepping thread died"
        if not self.engine.healthy:
            return False, self.engine.health_error or "unhealthy"
        return True, "ok"

    async def drain(self, timeout_s: float = 60.0) -> int:
        """Refuse new requests and wait for the running ones; returns how many remain."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._channel_of and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(self._channel_of)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.shutdown()

    # -- the stepping thread ------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.config.worker_id}",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._apply_commands()
            if engine.has_unfinished_requests():
                start = time.perf_counter()
                self._emit([e for output in engine.step() for e in self._events_of(output)])
                self._metrics.step_time.observe(time.perf_counter() - start, self._metrics.tags)
                # The report copies up to max_cached_hashes hashes: refresh it every few
                # steps, and always when the worker falls idle, not on every token.
                if start - self._reported_at >= _REPORT_INTERVAL_S or not engine.has_unfinished_requests():
                    self._report(start)
            else:
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()

    def _report(self, now: float) -> None:
        self._load = load_report(self.engine, self.config.worker_id, self.config.role,
                                 self.config.max_cached_hashes)
        self._metrics.update(self.engine.stats())
        self._reported_at = now

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(command[1])
            elif command[0] == "abort":
                self.engine.abort(command[1])

    def _add(self, r: WorkerRequest) -> None:
        try:
            self.engine.add_request(r.request_id, r.prompt_token_ids, r.params, priority=r.priority,
                                    arrival_time=r.arrival_time, output_token_ids=r.resume_token_ids)
        except (ValueError, TypeError, RuntimeError) as e:
            code = "worker_unhealthy" if isinstance(e, RuntimeError) else "invalid_request"
            self._emit([Failed(r.request_id, code, str(e))])

    def _events_of(self, out: StepOutput) -> list[Event]:
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
            channel = self._channel_of.get(event.request_id)
            if channel is None:
                continue  # aborted because its listener went away
            if isinstance(event, (Finished, Failed)):
                del self._channel_of[event.request_id]
                channel.requests.discard(event.request_id)
            channel.deliver(event)


class ChannelClosed(RuntimeError):
    """A submit on a channel whose listener has gone: the caller must subscribe anew."""


class _Channel:
    """The events of the requests submitted on one channel, released in batches: a
    request's first output with text and its last event go out at once (time to
    first token, end of stream), the rest at most every `interval_s`. Every batch takes everything
    pending, so one message carries a step (or a few) for all the channel's requests.
    Lives on the actor's event loop."""

    def __init__(self, channel_id: str, interval_s: float) -> None:
        self.channel_id = channel_id
        self.interval_s = interval_s
        self.requests: set[str] = set()  # submitted and not yet ended
        self._started: set[str] = set()  # requests that have sent an event
        self._pending: list[Event] = []
        self._urgent = False
        self._sent_at = -math.inf
        self._wake = asyncio.Event()

    def deliver(self, event: Event) -> None:
        self._pending.append(event)
        if isinstance(event, (Finished, Failed)):
            self._urgent = True
            self._started.discard(event.request_id)
        elif event.request_id not in self._started:
            self._urgent = True
            # Started once it shows text: a first token that ends inside a UTF-8
            # character (or a possible stop string) shows none, so the next is urgent too.
            if not isinstance(event, Tokens) or event.text or event.logprobs:
                self._started.add(event.request_id)
        self._wake.set()

    async def next_batch(self) -> list[Event]:
        while True:
            wait = None
            if self._pending:
                wait = 0.0 if self._urgent else self._sent_at + self.interval_s - time.monotonic()
                if wait <= 0:
                    break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
        batch, self._pending, self._urgent = self._pending, [], False
        self._sent_at = time.monotonic()
        return batch


def _coalesce(batch: list[Event]) -> list[Event]:
    """Merge each request's consecutive Tokens events into one: fewer objects per
    actor reply. Events of one request keep their order."""
    merged: list[Event] = []
    last_of: dict[str, int] = {}  # request id → its last event's place in `merged`
    for event in batch:
        at = last_of.get(event.request_id)
        last = merged[at] if at is not None else None
        if isinstance(event, Tokens) and isinstance(last, Tokens):
            logprobs = None if last.logprobs is None else last.logprobs + (event.logprobs or ())
            merged[at] = Tokens(last.request_id, last.start_index, last.token_ids + event.token_ids,
                                last.text + event.text, logprobs)
        else:
            last_of[event.request_id] = len(merged)
            merged.append(event)
    return merged
