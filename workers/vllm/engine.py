"""vLLM's V1 engine as a yard WorkerEngine (workers/engine/interface.py).

The worker's stepping thread drives vLLM's synchronous `LLMEngine` exactly as it
drives ours: add, abort, step. Its engine core runs in-process, on that thread, as
ours does (vLLM's tensor parallelism still starts its own rank processes). Each step's
outputs are deltas, turned into StepOutputs with absolute token indexes, so the
worker streams the same typed events.

What vLLM 0.32 does not let us do, the capabilities say: no live KV migration or
prefill/decode handoff (no block-level access to a running request through its API;
see docs/vllm-backend.md), so requests move by handover: recomputed, or between two
vLLM workers alike with their KV (kv_handover.py). vLLM hashes its prefix blocks
its own way: the load report names them by yard's hashes (prefix_hashes.py).
Resuming a request (failover) resubmits prompt + the tokens already sent as vLLM's
prompt: greedy output continues exactly; a seeded request restarts its random
sequence, and presence/frequency penalties no longer count the resumed tokens. The
text is yard's detokenizer's, which continues a resumed stream's text exactly (see
_with_text).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence as Seq

from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.llm_engine import LLMEngine as VLLMLLMEngine

from workers.engine.config import EngineConfig
from workers.engine.detokenizer import IncrementalDetokenizer, resumed_detokenizer
from workers.engine.freed_memory import keep_freed_memory
from workers.engine.interface import EngineCapabilities
from workers.engine.outputs import EngineStats, StepOutput
from workers.engine.request_checks import check_prompt, check_token_ids, output_room
from workers.load_report import KVLoad, RequestLoad
from workers.models.config import checkpoint_dtype
from workers.models.tokenizer import load_tokenizer
from workers.models.tiny import resolve_model
from workers.recompute_move import recompute_refusal
from workers.sampling_params import SamplingParams
from workers.vllm import kv_handover
from workers.vllm.convert import step_output, vllm_params
from workers.vllm.cpu_binding import bind_ranks
from workers.vllm.kv_handover import KVLayout, KVParts, KVPayload
from workers.vllm.prefix_hashes import CachedPrefixes
from workers.vllm.stats_tap import StatsTap

VLLM_CAPABILITIES = EngineCapabilities("vllm", kv_migration=False, expert_placement=False)
_RECENT_STEPS = 64  # window of the step-time average


@dataclass(slots=True)
class _Tracked:
    """A request inside vLLM, as yard counts it."""

    num_prompt_tokens: int  # the client's prompt (resumed tokens are not part of it)
    num_resumed: int  # output tokens produced elsewhere, handed to vLLM as prompt
    num_logprobs: Optional[int]
    arrival_time: float
    priority: int
    output_token_ids: list[int]  # all of them: resumed, then produced here
    recomputable: bool  # may move by recompute (workers/recompute_move.py)
    detokenizer: IncrementalDetokenizer  # yard's, stop strings included: see _with_text
    vllm_id: str  # vLLM's id for it (the request id and a suffix of vLLM's)
    kv_staged: bool = False  # came with KV from another worker, staged in the ranks until loaded

    @property
    def produced(self) -> int:
        return len(self.output_token_ids) - self.num_resumed

    @property
    def next_index(self) -> int:
        return len(self.output_token_ids)


class VLLMEngine:
    capabilities = VLLM_CAPABILITIES
    expert_moves = None  # no live expert re-placement (capabilities.expert_placement)

    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic) -> None:
        # The engine core steps on the caller's thread, like ours: no second process
        # per worker competing for its cores, and no IPC per step.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read when the engine is built
        if config.device == "cpu":
            bind_ranks(config.tensor_parallel_size)  # read when the rank processes start
            keep_freed_memory()  # here, and in the environment the rank processes start with
        self.config = config
        self.clock = clock
        self.model_dir = resolve_model(config.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self._tap = StatsTap()
        loggers = [self._tap.factory, *_ray_metrics_logger()]
        # As an OpenAI server: vLLM's batch defaults for that, where it is left to choose them.
        self.engine = VLLMLLMEngine.from_engine_args(_engine_args(config, self.model_dir), stat_loggers=loggers,
                                                     enable_multiprocessing=False,
                                                     usage_context=UsageContext.OPENAI_API_SERVER)
        model_config = self.engine.model_config
        self.max_model_len = model_config.max_model_len
        self._vocab_size = model_config.get_vocab_size()
        cache = self.engine.vllm_config.cache_config
        self.block_size = cache.block_size
        self._total_blocks = int(cache.num_gpu_blocks or 0)
        # Named in the routers' block size (config.block_size), not vLLM's.
        self._prefixes = (CachedPrefixes(config.block_size, self.block_size, max(2 * self._total_blocks, 1))
                          if config.enable_prefix_caching else None)
        self._requests: dict[str, _Tracked] = {}
        self._pending: list[StepOutput] = []  # ends of aborted requests, for the next step
        self._healthy = True
        self._health_error: Optional[str] = None
        self._num_steps = 0
        self._step_times: collections.deque[float] = collections.deque(maxlen=_RECENT_STEPS)
        self._busy_s = 0.0
        # Read once, here: the KV tensors never change, and after this only the
        # stepping thread calls the ranks, so that no call interleaves with a step.
        self._layout = kv_handover.layout(config.model, self._on_ranks)

    def _on_ranks(self, fn: Callable[..., Any], *args: Any) -> list:
        """fn(vLLM worker, *args) in every tensor-parallel rank, results in rank order."""
        return self.engine.collective_rpc(fn, args=args)

    # -- health ---------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def health_error(self) -> Optional[str]:
        return self._health_error

    def check_helpers(self) -> list[StepOutput]:
        return []  # vLLM's own rank processes are watched by vLLM: a death fails the next step

    def fail(self, error: str) -> list[StepOutput]:
        self._healthy, self._health_error = False, error
        failed = [StepOutput(rid, t.next_index, (), None, "", finish_reason="error", error=error,
                             num_prompt_tokens=t.num_prompt_tokens) for rid, t in self._requests.items()]
        try:
            self.engine.abort_request(list(self._requests))
        except Exception:  # noqa: BLE001 - the engine is already broken; the requests end anyway
            pass
        self._requests.clear()
        pending, self._pending = self._pending, []
        return pending + failed

    def shutdown(self) -> None:
        self._requests.clear()
        self.engine.engine_core.shutdown()

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    priority: int = 0, arrival_time: Optional[float] = None,
                    output_token_ids: Seq[int] = (), kv: Optional[KVPayload | KVParts] = None) -> None:
        """`kv`: the KV of a request handed over from another vLLM worker with this
        one's layout (workers/vllm/kv_handover.py), so that only its last token is
        computed here. Raises ValueError if its layout is not this engine's."""
        if not self._healthy:
            raise RuntimeError(f"engine is unhealthy: {self._health_error}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in this engine")
        check_prompt(list(prompt_token_ids), self._vocab_size)
        check_token_ids("output_token_ids", list(output_token_ids), self._vocab_size)
        tokens = list(prompt_token_ids) + list(output_token_ids)
        detokenizer = resumed_detokenizer(self.tokenizer, request_id, prompt_token_ids, output_token_ids, params)
        room = output_room(len(prompt_token_ids), self.max_model_len, "vLLM's max_model_len")
        max_tokens = min(params.max_tokens, room)
        if len(output_token_ids) >= max_tokens:
            raise ValueError(f"output_token_ids already holds {len(output_token_ids)} of "
                             f"max_tokens={max_tokens} tokens")
        sampling = vllm_params(params, max_tokens - len(output_token_ids))
        if kv is not None:
            own = self.handover_layout()
            if own is None:
                raise ValueError("this engine cannot take a request's KV (its KV caches are laid out in a way "
                                 "the handover cannot read)")
            kv_handover.stage(request_id, kv, own, self._on_ranks)
            sampling.extra_args = kv_handover.handover_params(request_id)
        try:
            vllm_id = self.engine.add_request(request_id, {"prompt_token_ids": tokens}, sampling,
                                              arrival_time=arrival_time, priority=-priority)
        except BaseException:
            if kv is not None:
                kv_handover.unstage(request_id, self._on_ranks)
            raise
        self._requests[request_id] = _Tracked(len(prompt_token_ids), len(output_token_ids), params.logprobs,
                                              self.clock() if arrival_time is None else arrival_time, priority,
                                              list(output_token_ids), recompute_refusal(params) is None,
                                              detokenizer, vllm_id, kv_staged=kv is not None)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its end (finish_reason "abort") comes out of the next step."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return False
        self.engine.abort_request([request_id])
        self._unstage(tracked, request_id)
        self._pending.append(StepOutput(request_id, tracked.next_index, (), None, "", finish_reason="abort",
                                        num_prompt_tokens=tracked.num_prompt_tokens))
        return True

    def take_for_recompute(self, request_id: str, with_kv: bool = False,
                           first_block: int = 0) -> tuple[tuple[int, ...], Optional[KVPayload]]:
        """Remove a request without ending it (it moves, to be computed again
        elsewhere): its output tokens so far, which its events have all carried, and
        with_kv, a copy of its KV so far from first_block on (the blocks before were
        pre-copied: copy_full_blocks); None where this engine cannot export it."""
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            raise ValueError(f"request {request_id!r} is not in this engine")
        own = self.handover_layout() if with_kv else None
        kv = self._export_kv(tracked, own, first_block, whole=True) if own is not None else None
        self.engine.abort_request([request_id])
        self._unstage(tracked, request_id)
        return tuple(tracked.output_token_ids), kv

    def _unstage(self, tracked: _Tracked, request_id: str) -> None:
        """A request that leaves: any KV handed to it and not loaded yet goes too."""
        if tracked.kv_staged:
            kv_handover.unstage(request_id, self._on_ranks)

    def copy_full_blocks(self, request_id: str, first_block: int) -> Optional[KVPayload]:
        """A pre-copy stage: copies of a running request's blocks from first_block on
        that its computed tokens fill. A full block no longer changes, so it can go
        ahead while the request decodes. None if no such block is new."""
        tracked = self._requests.get(request_id)
        own = self.handover_layout()
        if tracked is None or own is None:
            return None
        return self._export_kv(tracked, own, first_block, whole=False)

    def _export_kv(self, tracked: _Tracked, own: KVLayout, first_block: int, whole: bool) -> Optional[KVPayload]:
        scheduler = self._scheduler
        request = scheduler.requests.get(tracked.vllm_id)
        if request is None or request.num_computed_tokens == 0:
            return None
        num_tokens = request.num_computed_tokens
        if not whole:
            num_tokens -= num_tokens % own.block_size  # full blocks only
        if -(-num_tokens // own.block_size) <= first_block:
            return None
        (block_ids, *_) = scheduler.kv_cache_manager.get_block_ids(tracked.vllm_id)
        return kv_handover.export_kv(own, list(block_ids), num_tokens, self._on_ranks, first_block)

    @property
    def _scheduler(self) -> Any:
        return self.engine.engine_core.engine_core.scheduler  # in-process core (see __init__)

    def handover_layout(self) -> Optional[KVLayout]:
        """The KV layout a handed-over request's KV must have here (its ranks' shares
        of the heads included); None where this engine takes none."""
        return self._layout

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    # -- stepping ------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self._num_steps

    @property
    def stepped(self) -> bool:
        # A step that returns nothing may still have run a prefill chunk: never idle
        # while requests are in.
        return bool(self._requests)

    def step(self, before_forward: Optional[Callable[[], None]] = None) -> list[StepOutput]:
        if before_forward is not None:
            before_forward()
        steps, self._pending = self._pending, []
        if not self._requests:
            return steps
        start = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - start
        self._num_steps += 1
        self._step_times.append(elapsed)
        self._busy_s += elapsed
        for output in outputs:
            tracked = self._requests.get(output.request_id)
            if tracked is None:
                continue  # aborted after this step was scheduled
            out = _with_text(tracked.detokenizer, step_output(output, tracked.next_index, tracked.num_prompt_tokens,
                                                                tracked.num_logprobs))
            tracked.output_token_ids.extend(out.new_token_ids)
            if out.finished:
                del self._requests[output.request_id]
                kv_handover.unstage(output.request_id)  # never scheduled with it: a stop at once
                if not output.finished:  # a stop string, matched here: vLLM would go on
                    self.engine.abort_request([output.request_id])
            steps.append(out)
        if self._prefixes is not None:
            # After the step: a request that finished in it is gone, with at most its last block.
            self._prefixes.update(self._scheduler.requests.values())
        return steps

    def expire_reservations(self) -> list[str]:
        return []  # nothing is reserved: no migration comes in

    # -- what the load report reads -------------------------------------------------------------
    def stats(self) -> EngineStats:
        t = self._tap.totals
        # vLLM reports after each step only: once the last request is aborted or moved
        # away, no step runs to say that nothing runs and no block is in use.
        idle = not self._requests
        used = 0 if idle else min(self._total_blocks, math.ceil(t.kv_cache_usage * self._total_blocks))
        recent = self._step_times
        mean_step = sum(recent) / len(recent) if recent else 0.0
        return EngineStats(
            num_running=0 if idle else t.num_running, num_waiting=0 if idle else t.num_waiting,
            num_free_blocks=self._total_blocks - used, num_total_blocks=self._total_blocks,
            prefix_cache_hit_rate=t.prefix_hits / t.prefix_queries if t.prefix_queries else 0.0,
            num_preemptions=t.preemptions, num_steps=self._num_steps,
            # vLLM does not split its step: all of it counts as model time.
            mean_step_time_s=mean_step, mean_model_time_s=mean_step,
            total_step_time_s=self._busy_s, total_model_time_s=self._busy_s,
            prompt_tokens=t.prompt_tokens, generation_tokens=t.generation_tokens,
            computed_tokens=t.computed_prompt_tokens + t.generation_tokens,
            queued_prefill_tokens=sum(r.num_prompt_tokens + r.num_resumed for r in self._requests.values()
                                      if not r.produced))

    def kv_load(self, max_hashes: int) -> KVLoad:
        """From what yard tracks: a request runs once it has produced a token, and
        holds the blocks its tokens fill (vLLM does not say); the queue's head in
        vLLM's order, which is ours (priority, then arrival); the blocks vLLM's
        prefix cache holds, by yard's hashes (workers/vllm/prefix_hashes.py)."""
        def blocks(r: _Tracked) -> int:
            return -(-(r.num_prompt_tokens + len(r.output_token_ids)) // self.block_size)

        tracked = sorted(self._requests.items(), key=lambda item: not item[1].produced)  # running first
        requests = tuple(RequestLoad(rid, r.priority, blocks(r) if r.produced else 0, r.arrival_time,
                                     bool(r.produced), False, r.recomputable) for rid, r in tracked)
        waiting = [r for r in self._requests.values() if not r.produced]
        head = min(waiting, key=lambda r: (-r.priority, r.arrival_time), default=None)
        return KVLoad(self.block_size, 0 if head is None else blocks(head), head.priority if head is not None else 0,
                      requests, self._cached_hashes(max_hashes))

    def _cached_hashes(self, max_hashes: int) -> frozenset[int]:
        if self._prefixes is None or max_hashes == 0:
            return frozenset()
        scheduler = self._scheduler
        pool = scheduler.kv_cache_manager.block_pool
        groups = list(range(len(scheduler.kv_cache_config.kv_cache_groups)))
        return self._prefixes.cached(lambda h: pool.get_cached_block(h, groups) is not None, max_hashes)

    def offload_stats(self) -> None:
        return None


def _with_text(detokenizer: IncrementalDetokenizer, out: StepOutput) -> StepOutput:
    """The output's text, by yard's detokenizer rather than vLLM's: vLLM would take a
    resumed request's output so far for prompt, and where that split a UTF-8
    character its first text repeated the prompt's. yard's, fed the resumed tokens as
    output, continues the stream's text exactly, whichever engine served the rest.
    Stop strings are matched here too (vLLM cannot match them without its own
    detokenizer); the token that completes one ends the request."""
    texts = []
    for n, token in enumerate(out.new_token_ids, start=1):
        delta = detokenizer.update((token,))
        texts.append(delta.text)
        if delta.stop_string is not None:
            return dataclasses.replace(out, new_token_ids=out.new_token_ids[:n],
                                       new_logprobs=None if out.new_logprobs is None else out.new_logprobs[:n],
                                       new_text="".join(texts), finish_reason="stop", stop_reason=delta.stop_string)
    finish_reason, stop_reason = out.finish_reason, out.stop_reason
    if out.finished:
        tail = detokenizer.flush()  # held-back text is output after all, unless it completes a stop
        texts.append(tail.text)
        if tail.stop_string is not None:
            finish_reason, stop_reason = "stop", tail.stop_string
    return dataclasses.replace(out, new_text="".join(texts), finish_reason=finish_reason, stop_reason=stop_reason)


def _engine_args(config: EngineConfig, model_dir: Path) -> EngineArgs:
    return EngineArgs(
        # vLLM's "auto" runs a float32 checkpoint in a lower precision on CPU;
        # yard's default is the checkpoint's own dtype.
        model=str(model_dir), dtype=config.dtype or checkpoint_dtype(model_dir), seed=config.seed,
        block_size=_block_size(config), kv_cache_memory_bytes=int(config.kv_cache_memory_gib * 2**30),
        max_model_len=config.max_model_len, **_batch_limits(config),
        enable_chunked_prefill=config.enable_chunked_prefill, enable_prefix_caching=config.enable_prefix_caching,
        tensor_parallel_size=config.tensor_parallel_size,
        # yard runs higher priorities first, then earlier arrivals; vLLM's priority
        # policy runs lower values first: priorities go over negated.
        scheduling_policy="priority",
        enforce_eager=config.device == "cpu",  # vLLM's CPU build compiles nothing useful here
        kv_transfer_config=_handover_config(config))


def _handover_config(config: EngineConfig) -> KVTransferConfig:
    """Our KV connector: its scheduler half in the worker's process, its worker half
    in every rank."""
    return KVTransferConfig(kv_connector=kv_handover.CONNECTOR_NAME, kv_role="kv_both",
                            kv_connector_module_path=kv_handover.__name__)


def _batch_limits(config: EngineConfig) -> dict[str, Optional[int]]:
    """max_num_seqs and max_num_batched_tokens. On a GPU, yard's defaults (256 and
    2,048) mean vLLM's own for its device as an OpenAI server (1,024 and 8,192 on an
    H100 or H200): any other value goes to vLLM as it is. On CPU yard's defaults stand:
    through yard they beat vLLM's CPU server defaults of 128 and 2,048
    (docs/vllm-backend.md)."""
    limits: dict[str, Optional[int]] = {}
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        value = getattr(config, name)
        limits[name] = None if config.device != "cpu" and value == getattr(EngineConfig, name) else value
    return limits


def _block_size(config: EngineConfig) -> Optional[int]:
    """yard's default block size (16) means vLLM's own default for its platform: its
    CPU attention needs a multiple of 32. Any other value goes to vLLM as it is."""
    return None if config.block_size == EngineConfig.block_size else config.block_size


def _ray_metrics_logger() -> list:
    """vLLM's own metrics, exported through Ray's metrics agent beside yard's (as
    `ray_vllm:*`) when the engine runs in a Ray actor."""
    import ray

    if not ray.is_initialized():
        return []
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger]
