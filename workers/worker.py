"""The worker actor: one engine (rank 0 of its TP group), stepped in a background
thread, streaming typed events per request.

Ray calls arrive on the actor's asyncio loop; the engine is touched only by the
stepping thread. Calls hand it commands through a queue, and it hands events back
with `call_soon_threadsafe`. Each request's stream coalesces the events of a few
milliseconds into one batch, so a token does not cost an actor round trip.
"""

from __future__ import annotations

import asyncio
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


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    engine: EngineConfig
    role: str = "mixed"  # mixed, prefill or decode
    batch_window_s: float = 0.005  # events of one request coalesce over this long
    max_cached_hashes: int = 4096  # bound on the block hashes a load report carries

    def __post_init__(self) -> None:
        if self.role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role must be mixed, prefill or decode, got {self.role!r}")
        if not 0 <= self.batch_window_s <= 1:
            raise ValueError(f"batch_window_s must be in [0, 1], got {self.batch_window_s}")


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine = LLMEngine(config.engine)
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[Event]] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._draining = False
        self._load = load_report(self.engine, config.worker_id, config.role, config.max_cached_hashes)
        self._metrics = WorkerMetrics(config.worker_id, config.engine.model)
        self._reported_at = 0.0

    # -- calls from routers -----------------------------------------------------------------
    async def generate(self, request: WorkerRequest) -> AsyncIterator[list[Event]]:
        """Stream the request's events, in batches; the last batch ends with
        Finished or Failed. If the caller goes away, the request is aborted."""
        self._ensure_thread()
        events: asyncio.Queue[Event] = asyncio.Queue()
        rid = request.request_id
        if rid in self._streams:
            yield [Failed(rid, "invalid_request", f"request_id {rid!r} is already running here")]
            return
        if self._draining or not self.engine.healthy:
            code = "draining" if self._draining else "worker_unhealthy"
            yield [Failed(rid, code, f"worker {self.config.worker_id} is not taking requests ({code})")]
            return
        self._streams[rid] = events
        self._send(("add", request))
        done = False
        try:
            while not done:
                batch = await self._next_batch(events)
                done = isinstance(batch[-1], (Finished, Failed))
                yield _coalesce(batch)
        finally:
            self._streams.pop(rid, None)
            if not done:
                self._send(("abort", rid))

    async def _next_batch(self, events: "asyncio.Queue[Event]") -> list[Event]:
        batch = [await events.get()]
        deadline = time.monotonic() + self.config.batch_window_s
        while not isinstance(batch[-1], (Finished, Failed)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(events.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

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
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(self._streams)

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
                for output in engine.step():
                    self._publish(output)
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
            self._emit(Failed(r.request_id, code, str(e)))

    def _publish(self, out: StepOutput) -> None:
        if out.new_token_ids:
            logprobs = None if out.new_logprobs is None else tuple(
                TokenLogprob(t.token_id, t.logprob, t.top_logprobs or ()) for t in out.new_logprobs)
            self._emit(Tokens(out.request_id, out.start_index, out.new_token_ids, out.new_text, logprobs))
        if out.finish_reason == "error":
            self._emit(Failed(out.request_id, "worker_unhealthy", out.error or "engine failure"))
        elif out.finished:
            usage = Usage(out.num_prompt_tokens, out.start_index + len(out.new_token_ids), out.num_cached_tokens)
            self._emit(Finished(out.request_id, out.finish_reason, out.stop_reason, usage))

    def _emit(self, event: Event) -> None:
        stream = self._streams.get(event.request_id)
        if stream is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(stream.put_nowait, event)


def _coalesce(batch: list[Event]) -> list[Event]:
    """Merge consecutive Tokens events into one: fewer objects per actor reply."""
    merged: list[Event] = []
    for event in batch:
        last = merged[-1] if merged else None
        if isinstance(event, Tokens) and isinstance(last, Tokens):
            logprobs = None if last.logprobs is None else last.logprobs + (event.logprobs or ())
            merged[-1] = Tokens(last.request_id, last.start_index, last.token_ids + event.token_ids,
                                last.text + event.text, logprobs)
        else:
            merged.append(event)
    return merged
