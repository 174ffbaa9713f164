"""The step-level engine: add requests, step, abort, stats, and KV handoff.

One engine owns one model instance and its KV cache. `step()` schedules a batch,
runs the model once, samples, and returns what each request produced. The worker
actor calls it in a loop; the offline `LLM` calls it until every request is done.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence as Seq

import torch

from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig, max_model_len
from workers.engine.detokenizer import IncrementalDetokenizer, resumed_detokenizer
from workers.engine.model_runner import ModelRunner, kv_block_bytes
from workers.engine.expert_moves import ExpertMoves
from workers.engine.handoff import Destination, HandoffError, MigratedRequest, MigrationStep, Source
from workers.engine.interface import YARD_CAPABILITIES
from workers.engine.outputs import EngineStats, SeqTiming, StepOutput
from workers.engine.request_checks import check_prompt, check_token_ids, output_room
from workers.engine.sampler import SampledToken, Sampler, SamplingRow, uses_token_history
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import Sequence
from workers.experts.initial import initial_table
from workers.experts.table import PlacementTable
from workers.load_report import KVLoad, block_manager_load
from workers.models.config import ModelConfig, load_model_config
from workers.models.mixtral import check_placement
from workers.models.registry import load_model
from workers.models.tiny import resolve_model
from workers.models.tokenizer import load_tokenizer
from workers.offload.heads import rank_shards
from workers.parallel.bundles import WorkerBundles, adopt_worker_group
from workers.parallel.group import RankFailure
from workers.parallel.shards import ShardPlan
from workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from workers.offload.executor import OffloadExecutor
    from workers.offload.stats import OffloadStats
    from workers.parallel.executor import TPExecutor

_RECENT_STEPS = 64  # window of the step-time averages


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    capabilities = YARD_CAPABILITIES

    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.model_dir = resolve_model(config.model)
        mc = self.model_config = load_model_config(self.model_dir, config.dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        tp_size = config.tensor_parallel_size
        local_kv_heads = ShardPlan.for_rank(mc, 0, tp_size).kv_heads  # checks the split too
        num_blocks = config.num_kv_blocks or int(
            config.kv_cache_memory_gib * 2**30 // kv_block_bytes(mc, config.block_size, local_kv_heads))
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gib={config.kv_cache_memory_gib} holds no KV block")
        placement = self._expert_placement(mc)
        offload = config.attention_offload
        if offload is not None:
            rank_shards(mc.num_heads, mc.num_kv_heads, offload.workers, tp_size)  # checks the split
        bundles = WorkerBundles(tp_size, offload.workers if offload else 0)
        # The group the deployment made for this worker, if any (Ray only when needed).
        group = adopt_worker_group(bundles) if bundles.count > 1 else None
        self.executor = self._start_ranks(num_blocks, placement, group) if tp_size > 1 else None
        self.offload: Optional["OffloadExecutor"] = None
        try:
            _, model = load_model(self.model_dir, config.dtype, config.device,
                                  tp=self.executor.group if self.executor else None, placement=placement)
            if offload is not None:  # rank 0's attention workers (the other ranks start theirs)
                self.offload = self._start_attention_workers(
                    mc, num_blocks, self.executor.placement if self.executor else group, bundles)
        except BaseException:
            self.shutdown()  # the other ranks must not outlive a failed start
            raise
        self.health_error: Optional[str] = None
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                   watermark_blocks=num_blocks // 100)
        self.max_model_len, self.max_model_len_bound = max_model_len(config, mc.max_position_embeddings,
                                                                     self.blocks)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs,
                                                   config.enable_chunked_prefill), self.blocks)
        self.runner = ModelRunner(mc, model, num_blocks, config.block_size, config.device,
                                  config.attention_backend, tp=model.tp,
                                  **(self.offload.runner_args() if self.offload is not None else {}))
        self.expert_moves = ExpertMoves(model, clock) if getattr(model, "mover", None) is not None else None
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.source = Source(self.blocks, self.scheduler, self.requests)
        self.destination = Destination(self.blocks, self.scheduler, config.kv_reservation_timeout_s, clock)
        self._migrated_in = self._migrated_out = 0
        self._planned: dict[str, int] = {}  # the batch being planned (request id → tokens), in before_forward
        self.stepped = False  # whether the last step ran the model
        self._pending: list[StepOutput] = []  # abort notices, returned by the next step
        self._step_times: collections.deque[tuple[float, float]] = collections.deque(maxlen=_RECENT_STEPS)
        self._num_steps = 0
        self._total_step_time = 0.0
        self._total_model_time = 0.0
        self._prompt_tokens = 0
        self._computed_tokens = 0
        self._generation_tokens = 0

    def _expert_placement(self, mc: ModelConfig) -> Optional[PlacementTable]:
        """The starting table with expert parallelism, checked before any rank starts."""
        c = self.config
        if c.expert_parallel_size > 1 and not mc.is_moe:
            raise ValueError(f"expert_parallel_size {c.expert_parallel_size} needs a mixture-of-experts model; "
                             f"{c.model} ({mc.architecture}) has no experts")
        table = initial_table(c.expert_parallel_size, c.expert_placement, c.expert_slots_per_rank,
                              mc.num_layers, mc.num_experts)
        if table is not None:
            check_placement(table, mc, c.expert_parallel_size)
        return table

    def _start_ranks(self, num_blocks: int, placement: Optional[PlacementTable],
                     group: Optional["PlacementGroup"]) -> "TPExecutor":
        from workers.parallel.executor import TPExecutor  # imports Ray: only when needed

        c = self.config
        return TPExecutor(self.model_dir, c.dtype, c.tensor_parallel_size, num_blocks, c.block_size, c.device,
                          c.placement_strategy, c.tp_cpus_per_rank, c.tp_timeout_s, placement, group,
                          c.attention_offload)

    def _start_attention_workers(self, mc: ModelConfig, num_blocks: int, group: Optional["PlacementGroup"],
                                 bundles: WorkerBundles) -> "OffloadExecutor":
        from workers.offload.executor import OffloadExecutor  # imports Ray: only when needed

        c = self.config
        return OffloadExecutor(c.attention_offload, mc, num_blocks, c.block_size, c.device, c.tp_timeout_s,
                               group, 0, bundles)

    @property
    def healthy(self) -> bool:
        return self.health_error is None

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks and the attention workers (nothing to do
        without them)."""
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
        if self.offload is not None:
            self.offload.shutdown()
            self.offload = None

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
                    priority: int = 0, arrival_time: Optional[float] = None,
                    output_token_ids: Seq[int] = ()) -> None:
        """Queue a request. Raises ValueError, naming the field, if it can never run.

        `output_token_ids` resumes a request that already produced those tokens
        elsewhere (its worker died): they are recomputed with the prompt, and the
        output continues at their end, with the same absolute indexes."""
        self._check_healthy()
        seq = self._new_sequence(request_id, list(prompt_token_ids) + list(output_token_ids),
                                 len(prompt_token_ids), params, priority, arrival_time)
        if output_token_ids:
            check_token_ids("output_token_ids", seq.output_token_ids, self.model_config.vocab_size)
            if seq.num_output_tokens >= seq.max_tokens:
                raise ValueError(f"output_token_ids already holds {seq.num_output_tokens} of "
                                 f"max_tokens={seq.max_tokens} tokens")
        detokenizer = resumed_detokenizer(self.tokenizer, request_id, seq.prompt_token_ids, seq.output_token_ids,
                                          params)
        self.requests[request_id] = _Request(seq, detokenizer)
        self._prompt_tokens += seq.num_prompt_tokens
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, token_ids: list[int], num_prompt: int,
                      params: SamplingParams, priority: int, arrival_time: Optional[float],
                      check_tokens: bool = True) -> Sequence:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in this engine")
        if check_tokens:
            check_prompt(token_ids[:num_prompt], self.model_config.vocab_size)
        room = output_room(num_prompt, self.max_model_len, self.max_model_len_bound)
        return Sequence(request_id=request_id, token_ids=token_ids, num_prompt_tokens=num_prompt,
                        params=params, max_tokens=min(params.max_tokens, room), priority=priority,
                        arrival_time=self.clock() if arrival_time is None else arrival_time,
                        added_at=self.clock())

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.source.request_left(req.seq, "aborted")
        self.scheduler.remove(req.seq)
        self._pending.append(self._output(req.seq, (), None, "", "abort", None))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # -- stepping ------------------------------------------------------------------------
    def step(self, before_forward: Optional[Callable[[], None]] = None) -> list[StepOutput]:
        """One step. before_forward() runs once the batch is planned, before the model
        runs it (a handoff then takes the blocks this forward completes, to stream them
        layer by layer while it runs: stream_migration)."""
        start = time.perf_counter()
        self.destination.expire()
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            self.source.request_left(seq, "preempted")
        self.stepped = bool(plan.chunks)
        failed = self.advance_expert_move(stepping=self.stepped)
        if failed or not plan.chunks:
            return outputs + failed
        chunks = [(self.requests[rid].seq, n) for rid, n in plan.chunks.items()]
        now = self.clock()
        for seq, _ in chunks:
            if seq.first_scheduled_at is None:
                seq.first_scheduled_at = now
        if before_forward is not None:
            self._planned = plan.chunks
            try:
                before_forward()
            finally:
                self._planned = {}
        model_start = time.perf_counter()
        try:
            sampling, logits = self.runner.execute(chunks)
        except RankFailure as e:
            return outputs + self.fail(self._failure(e))
        model_time = time.perf_counter() - model_start
        for seq, n in chunks:
            seq.num_computed_tokens += n
            self._computed_tokens += n
            self.blocks.commit_computed(seq)
        if sampling:
            rows = [_sampling_row(s) for s in sampling]
            for seq, token in zip(sampling, self.sampler(logits, rows)):
                outputs.append(self._append_token(seq, token))
        step_time = time.perf_counter() - start
        self._num_steps += 1
        self._step_times.append((step_time, model_time))
        self._total_step_time += step_time
        self._total_model_time += model_time
        return outputs

    # -- expert re-placement (expert parallelism) -----------------------------------------
    def replace_experts(self, table: PlacementTable) -> None:
        """Begin moving the experts to `table`; steps carry it on (advance_expert_move)."""
        if self.expert_moves is None:
            raise ValueError("this worker runs without expert parallelism: there is no placement to replace")
        self.expert_moves.begin(table)

    def advance_expert_move(self, stepping: bool = False) -> list[StepOutput]:
        """One layer of a re-placement under way, between two steps (an idle worker
        calls it too); the failed requests' outputs if a rank failed meanwhile."""
        if self.expert_moves is None or not self.expert_moves.moving:
            return []
        try:
            self.expert_moves.advance(stepping)
        except RankFailure as e:
            return self.fail(self._failure(e))
        return []

    def _append_token(self, seq: Sequence, token: SampledToken) -> StepOutput:
        index = seq.num_output_tokens
        seq.token_ids.append(token.token_id)
        self._generation_tokens += 1
        detok = self.requests[seq.request_id].detokenizer
        delta = detok.update((token.token_id,))
        reason, stop_reason = self._finish_reason(seq, token.token_id, delta.stop_string)
        text = delta.text
        if reason is not None:
            if delta.stop_string is None:
                # Held-back text is real output after all, unless it completes a stop.
                tail = detok.flush()
                text += tail.text
                if tail.stop_string is not None:
                    reason, stop_reason = "stop", tail.stop_string
            self.source.request_left(seq, "finished")
            self.scheduler.remove(seq)
            del self.requests[seq.request_id]
        logprobs = (token,) if seq.params.logprobs is not None else None
        out = self._output(seq, (token.token_id,), logprobs, text, reason, stop_reason, index)
        now = self.clock()
        first = seq.first_output_at is None
        if first:
            seq.first_output_at = now
        if first or reason is not None:
            out = dataclasses.replace(out, timing=SeqTiming(seq.added_at, seq.first_scheduled_at or now,
                                                            seq.first_output_at, now, seq.migrated_in, first))
        return out

    def _finish_reason(self, seq: Sequence, token: int,
                       stop_string: Optional[str]) -> tuple[Optional[str], int | str | None]:
        if stop_string is not None:
            return "stop", stop_string
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return "stop", None
        if token in seq.params.stop_token_ids:
            return "stop", token
        if seq.num_output_tokens >= seq.max_tokens:
            return "length", None
        return None, None

    def _output(self, seq: Sequence, tokens: tuple[int, ...], logprobs: Optional[tuple[SampledToken, ...]],
                text: str, reason: Optional[str], stop_reason: int | str | None,
                index: Optional[int] = None) -> StepOutput:
        return StepOutput(request_id=seq.request_id,
                          start_index=seq.num_output_tokens if index is None else index,
                          new_token_ids=tokens, new_logprobs=logprobs, new_text=text,
                          finish_reason=reason, stop_reason=stop_reason,
                          num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens)

    def check_helpers(self) -> list[StepOutput]:
        """Fail the instance when one of its other ranks or attention workers has ended:
        they can die while it idles, and no step would notice. A Ray check that does
        not wait."""
        if not self.healthy:
            return []
        ended = self._ended_helper()
        return self.fail(ended) if ended else []

    def _ended_helper(self) -> Optional[str]:
        return (self.executor.check_ranks() if self.executor is not None else None) or \
            (self.offload.check_workers() if self.offload is not None else None)

    def _failure(self, e: RankFailure) -> str:
        """A failed step's error, with the rank or attention worker that ended, when one
        did: a timed-out collective alone does not say which, or why."""
        ended = self._ended_helper()
        return f"{e}; {ended}" if ended else str(e)

    def fail(self, error: str) -> list[StepOutput]:
        """The instance cannot step again (a rank is gone, or a step failed in a way
        that leaves its state unknown). Every request in it ends
        with the error, so its caller can retry it elsewhere."""
        self.health_error = error
        failed = []
        for req in list(self.requests.values()):
            self.source.request_left(req.seq, "failed")
            self.scheduler.remove(req.seq)
            failed.append(dataclasses.replace(self._output(req.seq, (), None, "", "error", None), error=error))
        self.requests.clear()
        return failed

    def _check_healthy(self) -> None:
        if self.health_error is not None:
            raise RuntimeError(f"engine is unhealthy: {self.health_error}")

    def handover_layout(self) -> None:
        """No KV comes with a request moved here by recompute: yard's engines move KV
        by live migration (workers/migration.py)."""
        return None

    def kv_load(self, max_hashes: int) -> KVLoad:
        return block_manager_load(self, max_hashes)

    def stats(self) -> EngineStats:
        steps = self._step_times
        blocks = self.blocks
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=blocks.num_free_blocks,
            num_total_blocks=blocks.num_blocks,
            prefix_cache_hit_rate=blocks.prefix_hit_tokens / blocks.prefix_query_tokens
            if blocks.prefix_query_tokens else 0.0,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._num_steps,
            mean_step_time_s=sum(s for s, _ in steps) / len(steps) if steps else 0.0,
            mean_model_time_s=sum(m for _, m in steps) / len(steps) if steps else 0.0,
            total_step_time_s=self._total_step_time,
            total_model_time_s=self._total_model_time,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            computed_tokens=self._computed_tokens,
            num_migrated_in=self._migrated_in,
            queued_prefill_tokens=self.scheduler.queued_prefill_tokens,
            num_migrated_out=self._migrated_out,
        )

    def offload_stats(self) -> Optional["OffloadStats"]:
        """The attention workers' traffic, timings and KV (None without offloading)."""
        if self.offload is None:
            return None
        return self.offload.stats(self.blocks.num_blocks - self.blocks.num_free_blocks)

    # -- live migration (handoff.py has the protocol's engine side) ------------------------
    # Source: start → advance* (stages, then the pause) → complete (or resume). Destination: reserve →
    # grow* → commit (or cancel). All on the stepping thread; read_kv and the writes
    # between begin_kv_write and end_kv_write may run on any other thread.
    def start_migration(self, migration_id: str, request_id: str) -> int:
        """Begin moving a request out; returns its tokens so far (the reservation's size)."""
        self._check_healthy()
        req = self.requests.get(request_id)
        if req is None:
            raise HandoffError("unknown", f"no request {request_id!r} in this engine")
        self.source.start(migration_id, req.seq)
        return req.seq.num_tokens

    def advance_migration(self, migration_id: str, pause_at_blocks: int, during_prefill: str = "pause"
                          ) -> MigrationStep:
        """The next pre-copy stage, or the pause with the last one (handoff.Source.advance)."""
        return dataclasses.replace(self.source.advance(migration_id, pause_at_blocks, during_prefill),
                                   engine_step=self._num_steps)

    def stream_migration(self, migration_id: str) -> MigrationStep:
        """A streaming handoff's round, taken before a forward (in step's before_forward)
        or between steps: the blocks the request's prompt fills up to the end of that
        forward (handoff.Source.stream). Its forward_id names the forward to wait on,
        layer by layer, before reading them (wait_layers)."""
        forward_id = self.runner.next_forward_id if self._planned else None
        step = self.source.stream(migration_id, self._planned, forward_id)
        return dataclasses.replace(step, engine_step=self._num_steps)

    def wait_layers(self, forward_id: int, layers: int, timeout_s: float) -> int:
        """Block (any thread) until forward `forward_id` has written the KV of its first
        `layers` layers; returns how many it has written by then."""
        return self.runner.progress.wait(forward_id, layers, timeout_s)

    @property
    def num_steps(self) -> int:
        """Steps that ran the model, since the engine started."""
        return self._num_steps

    def resume_after_migration(self, migration_id: str) -> None:
        self.source.resume(migration_id)

    def complete_migration(self, migration_id: str) -> int:
        """The destination committed: the request leaves this engine. Returns the
        output index the destination continues at."""
        seq = self.source.complete(migration_id)
        del self.requests[seq.request_id]
        self.scheduler.remove(seq)
        self._migrated_out += 1
        return seq.num_output_tokens

    def reserve_migration(self, migration_id: str, request_id: str, num_tokens: int) -> tuple[int, ...]:
        self._check_healthy()
        if request_id in self.requests:
            raise HandoffError("busy", f"request {request_id!r} is already in this engine")
        return self.destination.reserve(migration_id, request_id, num_tokens)

    def grow_reservation(self, migration_id: str, num_tokens: int) -> tuple[int, ...]:
        return self.destination.grow(migration_id, num_tokens)

    def commit_migration(self, migration_id: str, state: MigratedRequest) -> None:
        """Continue a request moved here: at output index state.next_index, with its
        sampler position, penalties, stop strings and detokenizer as they were."""
        self._check_healthy()
        seq = self._new_sequence(state.request_id, list(state.token_ids), state.num_prompt_tokens, state.params,
                                 state.priority, state.arrival_time, check_tokens=False)
        if seq.num_output_tokens >= seq.max_tokens:
            raise HandoffError("bad_state", f"request {state.request_id} already has {seq.num_output_tokens} "
                                            f"of {seq.max_tokens} tokens")
        seq.migrated_in = True
        self.destination.commit(migration_id, state, seq)
        detok = IncrementalDetokenizer.restore(self.tokenizer, state.params, state.detokenizer)
        self.requests[seq.request_id] = _Request(seq, detok)
        self._migrated_in += 1

    def cancel_migration(self, migration_id: str) -> bool:
        """Drop a destination-side reservation (the source gave up or died)."""
        return self.destination.cancel(migration_id)

    def expire_reservations(self) -> list[str]:
        return self.destination.expire()

    def read_kv(self, block_ids: Seq[int], layers: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """This process's shard of the blocks, all layers or layers [start, stop):
        [layers, 2, n, block_size, kv_heads, head_dim]."""
        self._check_block_ids(block_ids)
        return self.runner.read_blocks(list(block_ids), layers)

    def begin_kv_write(self, migration_id: str, first_block: int, num_blocks: int) -> tuple[int, ...]:
        return self.destination.begin_write(migration_id, first_block, num_blocks)

    def end_kv_write(self, migration_id: str) -> None:
        self.destination.end_write(migration_id)

    def write_kv(self, block_ids: Seq[int], data: torch.Tensor, layers: Optional[tuple[int, int]] = None) -> None:
        """Write this process's shard (of all layers, or of layers [start, stop)) into
        block ids obtained from begin_kv_write."""
        self.runner.write_blocks(list(block_ids), data, layers)

    @property
    def tp_ranks(self) -> list:
        """The other tensor-parallel ranks' actors (rank order), for transports."""
        return list(self.executor.ranks) if self.executor is not None else []

    def _get(self, request_id: str) -> Sequence:
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"no request {request_id!r} in this engine")
        return req.seq

    def _check_block_ids(self, block_ids: Seq[int]) -> None:
        bad = next((b for b in block_ids if not 0 <= b < self.blocks.num_blocks), None)
        if bad is not None:
            raise ValueError(f"block id {bad} is outside [0, {self.blocks.num_blocks})")


def _sampling_row(seq: Sequence) -> SamplingRow:
    """The row the sampler needs. Its token lists are copies, so they are made only
    for requests whose sampling reads them: copying every request's prompt and output
    on every step cost about half a millisecond at 200 requests."""
    if uses_token_history(seq.params):
        return SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids)
    return SamplingRow(seq.params, (), ())
