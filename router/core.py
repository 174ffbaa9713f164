"""What a router replica does for every request, whichever API it came through:
tokenize once, check the limits, shed load, pick a worker, follow the stream.

It keeps a snapshot of the workers, pulled from the cluster manager in the
background. Between two snapshots it adds its own dispatches to the loads it shows
the policy, so a burst does not all land on the worker that looked idlest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional

import ray

from router.config import MANAGER_NAMESPACE, RouterConfig
from router.dispatch import DispatchRequest, NoWorkerAvailable
from router.lifecycle import RequestStream
from router.load import WorkerLoad, worker_load
from router.load_book import LoadBook
from router.metrics import RouterMetrics
from router.auth import ApiKeys, Caller, check_priority
from router.limits import RequestLimits
from router.openai_errors import FORBIDDEN, SERVICE_UNAVAILABLE, TOO_MANY_REQUESTS, UNAUTHORIZED, APIError
from router.openai_protocol import GenerateRequest, check_prompt_token_ids
from router.policies import make_policy
from router.worker_link import WorkerLink
from workers.events import Event, Failed, Finished, Tokens, WorkerRequest, worker_actor_name
from workers.models.config import load_model_config
from workers.models.tiny import resolve_model
from workers.models.tokenizer import encode_chat, encode_prompt, load_tokenizer

log = logging.getLogger(__name__)



# Prompts this short are tokenized on the replica's event loop: at most a few hundred
# microseconds of encoding, about what the hop to the tokenizing thread and back costs
# a request at light load. Longer ones, and chats of more text, go to the thread, so
# that the replica's other streams go on meanwhile (bench/tokenize_stall.py).
INLINE_PROMPT_CHARS = 2048
INLINE_PROMPT_TOKEN_IDS = 16384  # token-id prompts are only checked: ~10 ns an id


def tokenize_inline(gen: GenerateRequest) -> bool:
    """Whether the prompt is small enough to tokenize on the event loop."""
    if gen.messages is not None:
        return sum(len(str(m.get("content") or "")) for m in gen.messages) <= INLINE_PROMPT_CHARS
    if isinstance(gen.prompt, str):
        return len(gen.prompt) <= INLINE_PROMPT_CHARS
    return len(gen.prompt) <= INLINE_PROMPT_TOKEN_IDS


class Overloaded(APIError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(TOO_MANY_REQUESTS, "every worker is at its queue limit; retry later",
                         None, "rate_limit_exceeded", "overloaded")
        self.retry_after_s = retry_after_s


class RouterCore:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        model_dir = resolve_model(config.model)
        self.model_config = load_model_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.keys = ApiKeys.load(config.api_keys_file, config.api_keys_env, config.allow_priority)
        self.limits = RequestLimits(config.max_body_bytes, config.max_prompt_tokens, config.max_completion_tokens)
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._last_tokenizing: Optional[concurrent.futures.Future] = None  # the thread is idle once it is done
        # The model's limit until the workers tell theirs (refresh): an engine may run
        # less (its settings, its KV cache), and the router must refuse what it cannot.
        self.max_model_len = self.model_config.max_position_embeddings
        self.policy = make_policy(config.policy, **config.policy_arguments())
        self.metrics = RouterMetrics(config.model_name)
        self.manager = ray.get_actor(config.manager_actor_name, namespace=MANAGER_NAMESPACE)
        self.handles: dict[str, Any] = {}
        self.links: dict[str, WorkerLink] = {}  # worker id → this replica's event stream from it
        self.book = LoadBook()  # the snapshot, corrected by this replica's own dispatches
        self._refresher: Optional[asyncio.Task] = None
        self._snapshot_version: Optional[tuple] = None  # the manager's, of the snapshot held
        self.in_flight: set[str] = set()  # ids of this replica's requests being streamed
        self.placed: dict[str, str] = {}  # request id -> the worker it runs on now
        self.handoffs: dict[str, str] = {}  # request id -> its decode worker, until sent to a prefill worker

    # -- the worker snapshot ---------------------------------------------------------------
    @property
    def loads(self) -> dict[str, WorkerLoad]:
        """The last snapshot, as the workers reported it."""
        return self.book.loads

    async def refresh(self) -> None:
        version, snapshot = await self.manager.snapshot_if_changed.remote(self._snapshot_version)
        if snapshot is None:
            return  # the snapshot this replica holds is still the manager's
        self._snapshot_version = version
        self.book.refresh({s.worker_id: worker_load(s.load, s.healthy) for s in snapshot if s.load is not None})
        self.handles = {s.worker_id: s.handle for s in snapshot}
        limits = [s.load.max_model_len for s in snapshot if s.load is not None and s.load.max_model_len]
        if limits:
            self.max_model_len = min(limits)
        for wid in [w for w in self.links if w not in self.handles]:
            self.links.pop(wid).close()

    def ensure_refreshing(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - keep serving on the last snapshot
                log.warning("refreshing the worker snapshot failed: %s", e)
            self.metrics.keep_alive()
            await asyncio.sleep(self.config.snapshot_interval_s)

    # -- requests ------------------------------------------------------------------------
    def tokenize(self, gen: GenerateRequest) -> list[int]:
        if gen.messages is not None:
            return encode_chat(self.tokenizer, list(gen.messages))
        if isinstance(gen.prompt, str):
            return encode_prompt(self.tokenizer, gen.prompt)
        check_prompt_token_ids(gen.prompt, self.model_config.vocab_size)
        return list(gen.prompt)

    async def _tokens(self, gen: GenerateRequest) -> list[int]:
        """The prompt's token ids: on the event loop where that is quicker than the hop
        to the tokenizing thread and back, and the thread is idle (one thread at a
        time may use the tokenizer); else on the thread."""
        busy = self._last_tokenizing is not None and not self._last_tokenizing.done()
        if not busy and tokenize_inline(gen):
            return self.tokenize(gen)
        self._last_tokenizing = self._tokenizing.submit(self.tokenize, gen)
        return await asyncio.wrap_future(self._last_tokenizing)

    async def prepare(self, gen: GenerateRequest, session_id: Optional[str], caller: Caller) -> WorkerRequest:
        """Tokens, final sampling parameters and a request id; raises APIError.
        Tokenizing a long prompt or chat takes milliseconds to seconds: it runs on a
        thread, so that the replica's other streams go on (one thread: a tokenizer is
        not safe to share between threads). A short one is quicker on the loop."""
        check_priority(caller, gen.priority)
        ids = await self._tokens(gen)
        self.limits.check_prompt(gen, len(ids))
        sampling = self.limits.cap_output(gen, gen.resolve_sampling(len(ids), self.max_model_len))
        self.check_capacity()
        request_id = gen.request_id or f"{gen.kind}-{uuid.uuid4().hex}"
        # Arrival at the router orders the request first-come-first-served on any
        # worker it reaches, across moves (wall clock: workers may be on other nodes).
        return WorkerRequest(request_id, tuple(ids), sampling, priority=gen.priority, arrival_time=time.time(),
                             session_id=session_id or gen.user)

    def refused(self, err: APIError) -> None:
        """Count a request answered with an error before any worker saw it."""
        shed = err.status in (TOO_MANY_REQUESTS, SERVICE_UNAVAILABLE) and err.code
        unauthorized = err.status in (UNAUTHORIZED, FORBIDDEN)
        self.metrics.finished(err.code if shed else "unauthorized" if unauthorized else "invalid_request")

    def check_capacity(self) -> None:
        """Shed load (429) when every healthy worker's queue is at the limit."""
        if self.book.saturated(self.config.max_queue_per_worker):
            raise Overloaded(self.config.retry_after_s)

    async def stream(self, request: WorkerRequest, prefer: Optional[str] = None) -> AsyncIterator[Event]:
        """The request's events, timed: TTFT, TPOT and end-to-end latency, and its
        final status, go to the metrics. `prefer`: a worker to send it to while that
        one is healthy (a request's other choices, router/choices.py).

        A request id is unique among this replica's requests in flight: a second one
        with the same id (gRPC clients choose theirs) is refused, because its events
        could not be told from the first's."""
        rid = request.request_id
        if rid in self.in_flight:
            self.metrics.finished("invalid_request")
            yield Failed(rid, "invalid_request", f"request_id: {rid!r} is already in flight on this router; "
                                                   "ids must be unique among requests in flight")
            return
        self.in_flight.add(rid)
        stream = RequestStream(request, lambda excluded: self._pick(request, excluded, prefer), self._open_stream,
                               self._report_failure, self.config.max_attempts,
                               lambda worker_id: self._follow_move(rid, worker_id), self._wait_for_worker)
        start, first, tokens = time.monotonic(), None, 0
        status: Optional[str] = None  # set by the request's last event
        self.metrics.started(+1)
        try:
            async for event in stream.events():
                if isinstance(event, Tokens):
                    first = first or time.monotonic()
                    tokens += len(event.token_ids)
                elif isinstance(event, Finished):
                    status = "ok"
                    self._observe(start, first, tokens, event)
                elif isinstance(event, Failed):
                    status = event.code
                yield event
        except NoWorkerAvailable:
            status = "no_worker"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = status or "cancelled"  # the client went away before the end
            raise
        finally:
            self.in_flight.discard(rid)
            self.placed.pop(rid, None)
            self.handoffs.pop(rid, None)
            for attempt in stream.attempts:
                self.book.finished(attempt.worker_id)
            self.metrics.started(-1)
            self.metrics.finished(status or "failed")

    def _observe(self, start: float, first: Optional[float], tokens: int, event: Finished) -> None:
        end = time.monotonic()
        first = first or end
        tpot = (end - first) / (tokens - 1) if tokens > 1 else None
        self.metrics.timings(first - start, tpot, end - start,
                             event.usage.cached_tokens // self.config.block_size)

    def _pick(self, request: WorkerRequest, excluded: frozenset[str], prefer: Optional[str] = None
              ) -> tuple[str, Any]:
        placement = self.book.place(DispatchRequest(request.request_id, request.prompt_token_ids, request.session_id),
                                    self.policy, self.config.block_size, self.config.decider_max_uncached_tokens,
                                    prefer, excluded)
        worker_id = placement.worker_id
        self.metrics.dispatched(placement.policy, worker_id, placement.predicted_hit_blocks)
        self.book.dispatched(worker_id, len(request.prompt_token_ids))
        self.placed[request.request_id] = worker_id
        if placement.handoff_to is not None:
            self.handoffs[request.request_id] = placement.handoff_to
        return worker_id, self._link(worker_id)

    def _open_stream(self, link: WorkerLink, request: WorkerRequest, attach: bool) -> AsyncIterator[list[Event]]:
        """The request's event batches from a worker; a new one sent to a prefill worker
        names the decode worker it goes on to."""
        decode_id = self.handoffs.pop(request.request_id, None)
        if decode_id is not None and not attach:
            request = dataclasses.replace(request, handoff_to=decode_id)
        return link.stream(request, attach)

    def _follow_move(self, request_id: str, worker_id: str) -> WorkerLink:
        """The link to where a request moved (with its KV): it now counts there."""
        self.book.dispatched(worker_id)
        self.placed[request_id] = worker_id
        if worker_id not in self.handles:  # newer than this replica's snapshot
            self.handles[worker_id] = ray.get_actor(worker_actor_name(worker_id), namespace=MANAGER_NAMESPACE)
        return self._link(worker_id)

    def _link(self, worker_id: str) -> WorkerLink:
        link = self.links.get(worker_id)
        if link is None or link.broken is not None:
            link = self.links[worker_id] = WorkerLink(worker_id, self.handles[worker_id])
        return link

    async def _wait_for_worker(self, excluded: frozenset[str]) -> None:
        """Until the snapshot shows a healthy worker outside `excluded` (the manager
        replaces one that died), or failover_wait_s has passed."""
        deadline = time.monotonic() + self.config.failover_wait_s
        while time.monotonic() < deadline:
            try:
                await self.refresh()
            except ray.exceptions.RayError as e:  # the manager restarting: its snapshot comes back
                log.warning("refreshing the worker snapshot failed: %s", e)
            if any(w.healthy and w.worker_id not in excluded for w in self.book.current()):
                return
            await asyncio.sleep(self.config.snapshot_interval_s)

    async def _report_failure(self, worker_id: str) -> None:
        self.book.forget(worker_id)
        try:
            await self.manager.report_failure.remote(worker_id)
        except ray.exceptions.RayError as e:
            log.warning("telling the manager about %s failed: %s", worker_id, e)
