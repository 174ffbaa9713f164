"""The model worker's side of its attention workers: one Ray actor per worker, each in
a bundle of its own (CPUs plus any resource label that puts it on another device
kind), and a process group that the model worker joins as rank 0. The bundles are
the last ones of the worker's placement group when the cluster manager made it
(workers/parallel/bundles.py); the offline engine makes a group of its own."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.engine.model_runner import kv_block_bytes
from workers.models.config import ModelConfig
from workers.offload.attention_worker import AttentionWorker
from workers.offload.commands import StopAttending
from workers.offload.config import AttentionOffloadConfig
from workers.offload.heads import rank_shards
from workers.offload.kv_blocks import OffloadedKV
from workers.offload.link import OffloadLink
from workers.offload.stats import OffloadStats
from workers.parallel.bundles import WorkerBundles
from workers.parallel.group import join_group, open_store
from workers.parallel.loops import ended_loop


ATTENTION_POLL_S = 1.0


class OffloadExecutor:
    def __init__(self, config: AttentionOffloadConfig, cfg: ModelConfig, num_blocks: int, block_size: int,
                 device: str, timeout_s: float, group: Optional[PlacementGroup] = None, rank: int = 0,
                 layout: Optional[WorkerBundles] = None) -> None:
        """The attention workers of tensor-parallel rank `rank` (K / tp_size of them),
        in their bundles of `group` (laid out as `layout`); without a group, in one
        of their own."""
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        layout = layout or WorkerBundles(1, config.workers)
        self.shards = rank_shards(cfg.num_heads, cfg.num_kv_heads, config.workers, layout.tp_size)
        self.owns_placement = group is None
        if self.owns_placement:
            self.placement = placement_group(config.bundles()[:len(self.shards)], strategy="PACK")
            self.bundle_indexes = list(range(len(self.shards)))
        else:
            self.placement = group
            first = rank * len(self.shards)
            self.bundle_indexes = [layout.attention_bundle(first + j) for j in range(len(self.shards))]
        self.workers: list = []
        self.timeout_s = timeout_s
        try:
            try:
                ray.get(self.placement.ready(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"attention offloading could not place its {config.workers} workers within "
                                   f"{timeout_s:g} s: they ask for bundles {config.bundles()}") from None
            self.link = self._start(config, cfg, num_blocks, block_size, device)
            self.kv = OffloadedKV(self.workers, self.shards, timeout_s)
            self.micro_batches = config.micro_batches
            self.shard_block_bytes = [kv_block_bytes(cfg, block_size, s.kv_heads) for s in self.shards]
            self.num_blocks = num_blocks
            self._attention_s = tuple(0.0 for _ in self.workers)
            self._asked: Optional[list] = None  # attention-time calls under way
            self._asked_at = float("-inf")
        except BaseException:
            self._release()
            raise

    def _start(self, config: AttentionOffloadConfig, cfg: ModelConfig, num_blocks: int, block_size: int,
               device: str) -> OffloadLink:
        size = len(self.shards) + 1
        host = ray.util.get_node_ip_address()
        store = open_store(host, size, self.timeout_s)
        actor = ray.remote(max_concurrency=2)(AttentionWorker)  # a second thread for calls beside serve()
        dtype = str(cfg.dtype).removeprefix("torch.")
        for j, (shard, index) in enumerate(zip(self.shards, self.bundle_indexes)):
            bundle = self.placement.bundle_specs[index]
            extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
            self.workers.append(actor.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), resources=extra or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement,
                                                                     placement_group_bundle_index=index)
            ).remote(j + 1, size, shard, cfg.num_layers, num_blocks, block_size, cfg.head_dim, dtype, device,
                     self.timeout_s))
        joined = [w.join.remote(host, store.port) for w in self.workers]
        group = join_group(store, host, store.port, 0, size, self.timeout_s)
        ray.get(joined, timeout=self.timeout_s * 4)
        self.loops = [w.serve.remote() for w in self.workers]
        return OffloadLink(group, self.shards)

    def runner_args(self) -> dict[str, Any]:
        """What the model runner of this rank takes to offload its attention here."""
        return {"offload": self.link, "offload_micro_batches": self.micro_batches, "offloaded_kv": self.kv}

    def check_workers(self) -> Optional[str]:
        """None while every attention worker's loop runs; else what ended one."""
        return ended_loop(self.loops, "attention worker")

    def stats(self, used_blocks: int) -> OffloadStats:
        """Never waits: the attention workers' compute times are those of the last
        poll, asked at most once per ATTENTION_POLL_S (a Ray call beside their loop)."""
        self._poll_attention_times()
        return OffloadStats(dataclasses.replace(self.link.traffic), self._attention_s,
                            tuple(used_blocks * b for b in self.shard_block_bytes),
                            tuple(self.num_blocks * b for b in self.shard_block_bytes))

    def _poll_attention_times(self) -> None:
        if self._asked is not None:
            ready, _ = ray.wait(self._asked, num_returns=len(self._asked), timeout=0)
            if len(ready) < len(self._asked):
                return
            try:
                self._attention_s = tuple(ray.get(self._asked))
            except ray.exceptions.RayError:
                pass  # a dead attention worker: the step path fails the instance
            self._asked = None
        now = time.monotonic()
        if now - self._asked_at >= ATTENTION_POLL_S:
            self._asked = [w.attention_seconds.remote() for w in self.workers]
            self._asked_at = now

    def shutdown(self) -> None:
        try:
            if self.check_workers() is None:
                self.link.group.broadcast_object(StopAttending())
                ray.get(self.loops, timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - tearing down a broken instance
            pass
        self._release()

    def _release(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        if self.owns_placement:
            remove_placement_group(self.placement)
