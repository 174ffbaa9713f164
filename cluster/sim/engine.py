"""One worker's engine on simulated time: the real scheduler, block manager and KV
handoff (Source, Destination), with the model replaced by the step-time model.

A step is planned (the scheduler's batch, and how long the model would take on it),
then finished when the simulated clock reaches its end: the chunks are computed and
each request that completes its prompt or decodes gets its next token, as
LLMEngine.step does. Tokens are not sampled: a request stops after the trace's
output length. The engine keeps the attributes that workers/load_report.py reads, so
the simulated workers report their load with the workers' own function.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Callable, Optional

from cluster.sim.step_time import StepTimeModel, batch_shape
from workers.engine.block_manager import BlockManager
from workers.engine.config import EngineConfig, max_model_len
from workers.engine.handoff import Destination, HandoffError, MigratedRequest, MigrationStep, Source
from workers.engine.interface import YARD_CAPABILITIES
from workers.engine.outputs import EngineStats
from workers.engine.scheduler import Scheduler, SchedulerConfig
from workers.engine.sequence import Sequence
from workers.load_report import KVLoad, block_manager_load
from workers.sampling_params import SamplingParams

_RECENT_STEPS = 64  # as LLMEngine's window of step times
# Every generated token: requests with the same prompt generate the same blocks, as
# greedy decoding would, and no prompt token of a trace is this large.
OUTPUT_TOKEN = 1 << 62


class _NoText:
    """The simulator makes no text: a moved request carries no detokenizer state."""

    def state(self) -> None:
        return None


@dataclass(slots=True)
class _Entry:
    seq: Sequence
    detokenizer: _NoText  # what handoff.Source reads of a request besides its sequence


@dataclass(frozen=True, slots=True)
class PlannedStep:
    chunks: tuple[tuple[Sequence, int], ...]  # (request, tokens it computes)
    duration_s: float


@dataclass(frozen=True, slots=True)
class Produced:
    """A token a step gave a request (its output index), and whether it ended it."""

    request_id: str
    index: int
    finished: bool


class SimEngine:
    capabilities = YARD_CAPABILITIES

    def __init__(self, config: EngineConfig, timing: StepTimeModel, clock: Callable[[], float]) -> None:
        if config.block_size != timing.block_size:
            raise ValueError(f"engine block_size {config.block_size} differs from the step-time model's "
                             f"{timing.block_size}: profile the model with this block size")
        self.config = config
        self.timing = timing
        self.clock = clock
        num_blocks = config.num_kv_blocks or int(config.kv_cache_memory_gib * 2**30 // timing.kv_block_bytes)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gib={config.kv_cache_memory_gib} holds no KV block")
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                   watermark_blocks=num_blocks // 100)
        self.max_model_len, _ = max_model_len(config, timing.max_position_embeddings, self.blocks)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs,
                                                   config.enable_chunked_prefill), self.blocks)
        self.requests: dict[str, _Entry] = {}
        self.source = Source(self.blocks, self.scheduler, self.requests)
        self.destination = Destination(self.blocks, self.scheduler, config.kv_reservation_timeout_s, clock)
        self.healthy = True
        self.num_steps = 0
        self.busy_s = 0.0  # simulated time spent stepping
        self._recent: collections.deque[float] = collections.deque(maxlen=_RECENT_STEPS)
        self.migrated_in = self.migrated_out = 0

    # -- requests ------------------------------------------------------------------------
    def add(self, request_id: str, prompt_token_ids: list[int], max_tokens: int, priority: int = 0,
            arrival_time: float = 0.0, output_token_ids: tuple[int, ...] = ()) -> None:
        """Queue a request (or resume one with the tokens it already produced)."""
        seq = self._sequence(request_id, list(prompt_token_ids) + list(output_token_ids), len(prompt_token_ids),
                             max_tokens, priority, arrival_time)
        self.requests[request_id] = _Entry(seq, _NoText())
        self.scheduler.add(seq)

    def _sequence(self, request_id: str, token_ids: list[int], num_prompt: int, max_tokens: int, priority: int,
                  arrival_time: float) -> Sequence:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in this engine")
        room = self.max_model_len - num_prompt
        if room < 1:
            raise ValueError(f"prompt has {num_prompt} tokens; it must be shorter than max_model_len "
                             f"({self.max_model_len})")
        return Sequence(request_id=request_id, token_ids=token_ids, num_prompt_tokens=num_prompt,
                        params=_params(max_tokens),
                        max_tokens=min(max_tokens, room), priority=priority, arrival_time=arrival_time,
                        added_at=self.clock())

    # -- stepping ------------------------------------------------------------------------
    def plan(self) -> Optional[PlannedStep]:
        """The next step's batch and its duration; None when there is nothing to run."""
        if not self.destination.idle:
            self.destination.expire()
        out = self.scheduler.schedule()
        for seq in out.preempted:
            self.source.request_left(seq, "preempted")
        if not out.chunks:
            return None
        chunks = tuple((self.requests[rid].seq, n) for rid, n in out.chunks.items())
        now = self.clock()
        for seq, _ in chunks:
            if seq.first_scheduled_at is None:
                seq.first_scheduled_at = now
        duration = self.timing.step_s(batch_shape((seq.num_computed_tokens, n) for seq, n in chunks))
        return PlannedStep(chunks, duration)

    def finish(self, step: PlannedStep) -> list[Produced]:
        """The step's model run is over: its KV is computed, its tokens come out."""
        produced = []
        for seq, n in step.chunks:
            seq.num_computed_tokens += n
            self.blocks.commit_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                produced.append(self._append_token(seq))
        self.record_steps([step.duration_s])
        return produced

    def record_steps(self, durations: list[float]) -> None:
        """Steps ran (here, or in a decode run: cluster/sim/decode_run.py), in order:
        each added to the busy time one by one, as the steps end."""
        busy = self.busy_s
        for d in durations:
            busy += d
        self.busy_s = busy
        self.num_steps += len(durations)
        self._recent.extend(durations)  # keeps the last _RECENT_STEPS, as appending each would

    def _append_token(self, seq: Sequence) -> Produced:
        index = seq.num_output_tokens
        seq.token_ids.append(OUTPUT_TOKEN)
        if seq.first_output_at is None:
            seq.first_output_at = self.clock()
        finished = seq.num_output_tokens >= seq.max_tokens
        if finished:
            self.source.request_left(seq, "finished")
            self.scheduler.remove(seq)
            del self.requests[seq.request_id]
        return Produced(seq.request_id, index, finished)

    # -- what the load report reads ------------------------------------------------------
    def kv_load(self, max_hashes: int) -> KVLoad:
        return block_manager_load(self, max_hashes)

    def stats(self) -> EngineStats:
        recent = self._recent
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.blocks.num_free_blocks, num_total_blocks=self.blocks.num_blocks,
            prefix_cache_hit_rate=self.blocks.prefix_hit_tokens / self.blocks.prefix_query_tokens
            if self.blocks.prefix_query_tokens else 0.0,
            num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
            mean_step_time_s=sum(recent) / len(recent) if recent else 0.0,
            mean_model_time_s=sum(recent) / len(recent) if recent else 0.0,
            total_step_time_s=self.busy_s, total_model_time_s=self.busy_s,
            prompt_tokens=0, generation_tokens=0, num_migrated_in=self.migrated_in,
            queued_prefill_tokens=self.scheduler.queued_prefill_tokens,
            num_migrated_out=self.migrated_out)

    # -- KV handoff (the engine side of LLMEngine's, without the KV itself) ---------------
    def start_migration(self, migration_id: str, request_id: str) -> int:
        entry = self.requests.get(request_id)
        if entry is None:
            raise HandoffError("unknown", f"no request {request_id!r} in this engine")
        self.source.start(migration_id, entry.seq)
        return entry.seq.num_tokens

    def advance_migration(self, migration_id: str, pause_at_blocks: int) -> MigrationStep:
        return self.source.advance(migration_id, pause_at_blocks)

    def complete_migration(self, migration_id: str) -> int:
        seq = self.source.complete(migration_id)
        del self.requests[seq.request_id]
        self.scheduler.remove(seq)
        self.migrated_out += 1
        return seq.num_output_tokens

    def reserve_migration(self, migration_id: str, request_id: str, num_tokens: int) -> tuple[int, ...]:
        if request_id in self.requests:
            raise HandoffError("busy", f"request {request_id!r} is already in this engine")
        return self.destination.reserve(migration_id, request_id, num_tokens)

    def commit_migration(self, migration_id: str, state: MigratedRequest) -> None:
        seq = self._sequence(state.request_id, list(state.token_ids), state.num_prompt_tokens,
                             state.params.max_tokens, state.priority, state.arrival_time)
        seq.migrated_in = True
        self.destination.commit(migration_id, state, seq)
        self.requests[seq.request_id] = _Entry(seq, _NoText())
        self.migrated_in += 1


@functools.lru_cache(maxsize=4096)
def _params(max_tokens: int) -> SamplingParams:
    # Frozen, so requests of one length share one: validating a new one per request is
    # a tenth of a simulated request's cost.
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)
