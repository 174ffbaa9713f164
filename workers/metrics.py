"""A worker's metrics, through Ray's metrics API: every node's Prometheus endpoint
exports them (prefixed `ray_`). Names and meanings are listed in docs/metrics.md."""

from __future__ import annotations

from ray.util import metrics

from workers.engine.outputs import EngineStats
from workers.migration import MigrationResult
from workers.offload.link import OffloadTraffic
from workers.offload.stats import OffloadStats

MIGRATION_DOWNTIME_BOUNDARIES = [0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5]
STEP_TIME_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
PHASE_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TRANSFER_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
REPLACEMENT_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# DistServe's breakdown of a request's latency. A request prefilled and decoded on one
# worker has no transfer or decode_queue.
PHASES = ("prefill_queue", "prefill", "transfer", "decode_queue", "decode")


class WorkerMetrics:
    """Gauges are set and counters advanced from engine stats every few steps."""

    def __init__(self, worker_id: str, model: str, role: str = "mixed") -> None:
        self.tags = {"worker": worker_id, "model": model, "role": role}
        keys = ("worker", "model", "role")
        self.running = metrics.Gauge("yard_worker_requests_running", "requests running", keys)
        self.waiting = metrics.Gauge("yard_worker_requests_waiting", "requests waiting", keys)
        self.kv_used = metrics.Gauge("yard_worker_kv_blocks_used", "KV blocks in use", keys)
        self.kv_total = metrics.Gauge("yard_worker_kv_blocks_total", "KV blocks in the cache", keys)
        self.hit_rate = metrics.Gauge("yard_worker_prefix_cache_hit_rate",
                                      "prompt tokens served from the prefix cache / prompt tokens", keys)
        self.prompt_tokens = metrics.Counter("yard_worker_prompt_tokens", "prompt tokens admitted", keys)
        self.generation_tokens = metrics.Counter("yard_worker_generation_tokens", "tokens generated", keys)
        self.preemptions = metrics.Counter("yard_worker_preemptions", "requests preempted", keys)
        self.step_time = metrics.Histogram("yard_worker_step_time_seconds", "engine step time",
                                           STEP_TIME_BOUNDARIES, keys)
        self.migration_downtime = metrics.Histogram(
            "yard_worker_migration_downtime_seconds",
            "live migration downtime: the request's pause at the source to its first token here",
            MIGRATION_DOWNTIME_BOUNDARIES, keys)
        self.handoffs = metrics.Counter(
            "yard_worker_handoffs", "prefill-to-decode handoffs this worker started, by outcome "
            "(committed; aborted or failed: the request went on here)", keys + ("outcome",))
        self.queued_prefill_tokens = metrics.Gauge(
            "yard_worker_queued_prefill_tokens", "prompt tokens admitted and not yet computed", keys)
        self.phase = metrics.Histogram(
            "yard_worker_request_phase_seconds", "a request's time in one phase on this worker: prefill_queue, "
            "prefill, transfer (first token to the decode worker's commit), decode_queue, decode",
            PHASE_BOUNDARIES, keys + ("phase",))
        self.transfer_time = metrics.Histogram(
            "yard_worker_kv_transfer_seconds", "time a migration or handoff from this worker spent copying KV",
            TRANSFER_BOUNDARIES, keys + ("reason",))
        self.transfer_bytes = metrics.Counter(
            "yard_worker_kv_transfer_bytes", "KV bytes sent by migrations and handoffs from this worker",
            keys + ("reason",))
        self.transfer_hidden = metrics.Counter(
            "yard_worker_kv_transfer_hidden_seconds", "copy time of handoffs spent while the prompt was still "
            "computing (hidden behind the prefill)", keys + ("reason",))
        self.expert_load = metrics.Counter(
            "yard_worker_expert_tokens", "tokens routed to each expert of each MoE layer (each of a token's "
            "top-k choices counts)", keys + ("layer", "expert"))
        self.expert_dispatched = metrics.Counter(
            "yard_worker_expert_dispatched_tokens", "expert parallelism: (token, choice) pairs sent to the rank "
            "of the expert slot that serves them, per MoE layer (a pair on its own rank counts too)",
            keys + ("layer",))
        self.expert_cross_rank = metrics.Counter(
            "yard_worker_expert_cross_rank_tokens", "expert parallelism: (token, choice) pairs that crossed to "
            "another rank, per MoE layer", keys + ("layer",))
        self.expert_balancedness = metrics.Gauge(
            "yard_worker_expert_balancedness", "expert parallelism: mean over max pairs served per rank, per MoE "
            "layer, over the last minute (1 is even; with no traffic in that minute, the last value)",
            keys + ("layer",))
        self.expert_replacements = metrics.Counter(
            "yard_worker_expert_replacements", "live expert re-placements, by outcome (done, aborted)",
            keys + ("outcome",))
        self.expert_replacement_time = metrics.Histogram(
            "yard_worker_expert_replacement_seconds", "a live expert re-placement, from its start to the swap "
            "(or the abort)", REPLACEMENT_BOUNDARIES, keys)
        self._last: EngineStats | None = None
        self._offload_metrics(keys)
        # Running (count, seconds) per phase and of KV copies, for `Worker.phase_totals`.
        self.totals: dict[str, tuple[int, float]] = {}

    def _offload_metrics(self, keys: tuple[str, ...]) -> None:
        per_worker = keys + ("attention_worker",)
        self.offload_bytes = metrics.Counter(
            "yard_worker_offload_bytes", "attention offloading: bytes sent to the attention workers (direction "
            "out: q, k, v) and received from them (in: attention outputs)", keys + ("direction",))
        self.offload_forwards = metrics.Counter(
            "yard_worker_offload_forwards", "attention offloading: forwards that ran their attention on the "
            "attention workers", keys)
        self.offload_layer_calls = metrics.Counter(
            "yard_worker_offload_layer_calls", "attention offloading: micro-batch-layers exchanged with the "
            "attention workers", keys)
        self.offload_seconds = metrics.Counter(
            "yard_worker_offload_seconds", "attention offloading, seconds: forward (whole forwards), blocked "
            "(waiting for attention outputs), exchange (from sending q, k, v to having the outputs, per "
            "micro-batch-layer); dense compute is forward - blocked, the hidden share 1 - blocked / exchange",
            keys + ("part",))
        self.offload_attention_seconds = metrics.Counter(
            "yard_worker_offload_attention_seconds", "attention offloading: seconds each attention worker spent "
            "computing attention", per_worker)
        self.offload_kv_bytes = metrics.Gauge(
            "yard_worker_offload_kv_bytes", "attention offloading: each attention worker's shard of the KV blocks "
            "in use", per_worker)
        self.offload_kv_capacity_bytes = metrics.Gauge(
            "yard_worker_offload_kv_capacity_bytes", "attention offloading: each attention worker's shard of the "
            "whole KV cache", per_worker)
        self._last_offload: OffloadStats | None = None

    def offload(self, stats: OffloadStats) -> None:
        """Counters advanced and gauges set from an offloading worker's stats."""
        t, now, last = self.tags, stats.traffic, self._last_offload
        before = last.traffic if last is not None else OffloadTraffic()
        for counter, tags, field in (
                (self.offload_bytes, {**t, "direction": "out"}, "bytes_out"),
                (self.offload_bytes, {**t, "direction": "in"}, "bytes_in"),
                (self.offload_forwards, t, "steps"),
                (self.offload_layer_calls, t, "layer_calls"),
                (self.offload_seconds, {**t, "part": "forward"}, "forward_s"),
                (self.offload_seconds, {**t, "part": "blocked"}, "blocked_s"),
                (self.offload_seconds, {**t, "part": "exchange"}, "exchange_s")):
            if getattr(now, field) > getattr(before, field):
                counter.inc(getattr(now, field) - getattr(before, field), tags)
        for j, seconds in enumerate(stats.attention_s):
            tags = {**t, "attention_worker": str(j)}
            previous = last.attention_s[j] if last is not None else 0.0
            if seconds > previous:
                self.offload_attention_seconds.inc(seconds - previous, tags)
            self.offload_kv_bytes.set(stats.kv_bytes_used[j], tags)
            self.offload_kv_capacity_bytes.set(stats.kv_bytes_total[j], tags)
        self._last_offload = stats

    def update(self, stats: EngineStats) -> None:
        """Gauges and counters from the engine's stats; step times are observed per step."""
        t = self.tags
        self.running.set(stats.num_running, t)
        self.waiting.set(stats.num_waiting, t)
        self.kv_used.set(stats.num_total_blocks - stats.num_free_blocks, t)
        self.kv_total.set(stats.num_total_blocks, t)
        self.hit_rate.set(stats.prefix_cache_hit_rate, t)
        self.queued_prefill_tokens.set(stats.queued_prefill_tokens, t)
        last = self._last
        for counter, now, before in (
                (self.prompt_tokens, stats.prompt_tokens, last.prompt_tokens if last else 0),
                (self.generation_tokens, stats.generation_tokens, last.generation_tokens if last else 0),
                (self.preemptions, stats.num_preemptions, last.num_preemptions if last else 0)):
            if now > before:
                counter.inc(now - before, t)
        self._last = stats

    def expert_tokens(self, loads: tuple[tuple[int, ...], ...]) -> None:
        for layer, row in enumerate(loads):
            for expert, tokens in enumerate(row):
                if tokens:
                    self.expert_load.inc(tokens, {**self.tags, "layer": str(layer), "expert": str(expert)})

    def expert_dispatch(self, moved: list[list[list[int]]], balancedness: list) -> None:
        for layer, m in enumerate(moved):
            tags = {**self.tags, "layer": str(layer)}
            pairs = sum(map(sum, m))
            if pairs:
                self.expert_dispatched.inc(pairs, tags)
                crossed = pairs - sum(m[r][r] for r in range(len(m)))
                if crossed:
                    self.expert_cross_rank.inc(crossed, tags)
            if balancedness[layer] is not None:
                self.expert_balancedness.set(balancedness[layer], tags)

    def expert_replacement(self, outcome: str, seconds: float) -> None:
        self.expert_replacements.inc(1, {**self.tags, "outcome": outcome})
        self.expert_replacement_time.observe(seconds, self.tags)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phase.observe(max(seconds, 0.0), {**self.tags, "phase": phase})
        self._total(phase, max(seconds, 0.0))

    def _total(self, key: str, seconds: float) -> None:
        count, total = self.totals.get(key, (0, 0.0))
        self.totals[key] = (count + 1, total + seconds)

    def observe_transfer(self, result: MigrationResult) -> None:
        if not result.bytes:
            return
        tags = {**self.tags, "reason": result.reason}
        self.transfer_time.observe(result.copy_s, tags)
        self.transfer_bytes.inc(result.bytes, tags)
        if result.prefill_copy_s > 0:
            self.transfer_hidden.inc(result.prefill_copy_s, tags)
        self._total(f"kv_copy_{result.reason}", result.copy_s)
        self._total(f"kv_copy_hidden_{result.reason}", result.prefill_copy_s)
