"""The leader's side of a tensor-parallel instance: one placement group, one Ray
actor per rank 1..N-1, and a gloo (CPU) process group that the leader, rank 0,
joins from its own process.

The rendezvous store listens on the leader's node address on a port the OS picks,
and the group is private to this instance, so instances never collide on ports or
names. Collectives carry a timeout: a dead or hung rank surfaces as RankFailure
within it instead of hanging the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.parallel.commands import Stop
from workers.parallel.group import TPGroup, join_group, open_store
from workers.parallel.rank_worker import RankWorker

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


class TPExecutor:
    def __init__(self, model_dir: Path, dtype: Optional[str], size: int, num_blocks: int, block_size: int,
                 device: str, strategy: str, cpus_per_rank: float, timeout_s: float) -> None:
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        # Bundle 0 is the leader's. A worker actor already sits in bundle 0 of the
        # group the cluster manager made for it; anywhere else (the offline LLM's
        # driver) this instance makes its own group and owns it.
        current = get_current_placement_group()
        self.owns_placement = current is None or len(current.bundle_specs) != size
        if self.owns_placement:
            self.placement = placement_group([{"CPU": cpus_per_rank}] * size, strategy=strategy)
        else:
            self.placement = current
        ray.get(self.placement.ready(), timeout=timeout_s)
        host = ray.util.get_node_ip_address()
        store = open_store(host, size, timeout_s)
        actor = ray.remote(max_concurrency=2)(RankWorker)
        self.ranks = [
            actor.options(num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              self.placement, placement_group_bundle_index=rank)).remote(
                    str(model_dir), dtype, rank, size, num_blocks, block_size, device, timeout_s)
            for rank, bundle in enumerate(self.placement.bundle_specs) if rank > 0
        ]
        joined = [r.join.remote(host, store.port) for r in self.ranks]
        self.group: TPGroup = join_group(store, host, store.port, 0, size, timeout_s)
        ray.get(joined, timeout=timeout_s * 4)  # rank shards load after the rendezvous
        self.loops = [r.serve.remote() for r in self.ranks]
        self.timeout_s = timeout_s

    def check_ranks(self) -> Optional[str]:
        """None while every rank's command loop runs; else what ended one."""
        done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        for ref in done:
            try:
                return f"rank {self.loops.index(ref) + 1} stopped: {ray.get(ref)}"
            except Exception as e:  # a dead actor or a failed collective
                return f"rank {self.loops.index(ref) + 1} failed: {e}"
        return None

    def shutdown(self) -> None:
        try:
            if self.check_ranks() is None:
                self.group.broadcast_object(Stop())
                ray.get(self.loops, timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - tearing down a broken instance
            pass
        for rank in self.ranks:
            ray.kill(rank)
        if self.owns_placement:
            remove_placement_group(self.placement)
