"""The leader's side of a tensor-parallel instance: one placement group, one Ray
actor per rank 1..N-1, and a gloo (CPU) process group that the leader, rank 0,
joins from its own process.

The rendezvous store listens on the leader's node address on a port the OS picks,
and the group is private to this instance, so instances never collide on ports or
names. Collectives carry a timeout: a dead or hung rank surfaces as RankFailure
within it instead of hanging the caller.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.experts.table import PlacementTable
from workers.offload.config import AttentionOffloadConfig
from workers.parallel.commands import Stop
from workers.parallel.group import TPGroup, join_group, open_store
from workers.parallel.loops import ended_loop
from workers.parallel.rank_worker import RankWorker

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
FREE_CPUS_WAIT_S = 5.0


class TPExecutor:
    def __init__(self, model_dir: Path, dtype: Optional[str], size: int, num_blocks: int, block_size: int,
                 device: str, strategy: str, cpus_per_rank: float, timeout_s: float,
                 placement: Optional[PlacementTable] = None, group: Optional[PlacementGroup] = None,
                 offload: Optional[AttentionOffloadConfig] = None) -> None:
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        # Bundle 0 is the leader's. A worker actor already sits in bundle 0 of the
        # group the cluster manager made for it (`group`, workers/parallel/bundles.py:
        # bundles 1..size-1 are the other ranks', then the attention workers');
        # anywhere else (the offline LLM's driver) this instance makes its own group
        # with the same layout and owns it.
        self.owns_placement = group is None
        if self.owns_placement:
            bundles = [{"CPU": cpus_per_rank}] * size + (offload.bundles() if offload else [])
            _wait_for_free_cpus(sum(b["CPU"] for b in bundles), bundles)
            self.placement = placement_group(bundles, strategy=strategy)
        else:
            self.placement = group
        self.ranks: list = []
        try:
            self._wait_for_placement(timeout_s)
            self._start(model_dir, dtype, size, num_blocks, block_size, device, timeout_s, placement, offload)
        except BaseException:
            self._release()  # no rank or bundle outlives a failed start
            raise

    def _wait_for_placement(self, timeout_s: float) -> None:
        try:
            ray.get(self.placement.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(_placement_error(f"could not place within {timeout_s:g} s",
                                                self.placement.bundle_specs)) from None

    def _start(self, model_dir: Path, dtype: Optional[str], size: int, num_blocks: int, block_size: int,
               device: str, timeout_s: float, placement: Optional[PlacementTable],
               offload: Optional[AttentionOffloadConfig]) -> None:
        host = ray.util.get_node_ip_address()
        store = open_store(host, size, timeout_s)
        actor = ray.remote(max_concurrency=2)(RankWorker)
        self.ranks = [
            actor.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self.placement, placement_group_bundle_index=rank)).remote(
                    str(model_dir), dtype, rank, size, num_blocks, block_size, device, timeout_s,
                    placement.to_dict() if placement is not None else None, offload)
            for rank, bundle in enumerate(self.placement.bundle_specs[:size]) if rank > 0
        ]
        joined = [r.join.remote(host, store.port) for r in self.ranks]
        self.group: TPGroup = join_group(store, host, store.port, 0, size, timeout_s)
        ray.get(joined, timeout=timeout_s * 4)  # rank shards load after the rendezvous
        self.loops = [r.serve.remote() for r in self.ranks]
        self.timeout_s = timeout_s

    def check_ranks(self) -> Optional[str]:
        """None while every rank's command loop runs; else what ended one."""
        return ended_loop(self.loops, "rank")

    def shutdown(self) -> None:
        try:
            if self.check_ranks() is None:
                self.group.broadcast_object(Stop())
                ray.get(self.loops, timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - tearing down a broken instance
            pass
        self._release()

    def _release(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
        if self.owns_placement:
            remove_placement_group(self.placement)


def _wait_for_free_cpus(cpus: float, bundles: list[dict[str, float]]) -> None:
    """Fail within FREE_CPUS_WAIT_S, not after the whole timeout, when the CPUs are not
    free (an earlier instance most likely still holds them). The short wait covers
    CPUs an instance closed a moment ago: Ray's free count lags their release."""
    deadline = time.monotonic() + FREE_CPUS_WAIT_S
    while cpus > ray.available_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            raise RuntimeError(_placement_error("cannot place", bundles))
        time.sleep(0.1)


def _placement_error(what: str, bundles: list[dict[str, float]]) -> str:
    return (f"tensor parallelism {what} its {len(bundles)} ranks: it asks for bundles {bundles}, and the "
            f"cluster has {ray.available_resources().get('CPU', 0):g} CPUs free of "
            f"{ray.cluster_resources().get('CPU', 0):g}. Does an earlier instance still hold them? Close it "
            f"(LLM.close(), or `with LLM(...)`)")
