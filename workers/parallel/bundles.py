"""A worker's placement group, bundle by bundle: bundle 0 for the worker actor
(tensor-parallel rank 0), then one per further rank, then one per attention worker.
The cluster manager makes the group with this layout; inside the worker actor, the
executors find their bundles in it by the same layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup


@dataclass(frozen=True)
class WorkerBundles:
    tp_size: int
    attention_workers: int = 0

    @property
    def count(self) -> int:
        return self.tp_size + self.attention_workers

    def attention_bundle(self, worker: int) -> int:
        """The bundle index of attention worker `worker` (from 0)."""
        return self.tp_size + worker


def adopt_worker_group(layout: WorkerBundles) -> Optional["PlacementGroup"]:
    """The placement group this process sits in, when there is one: it must have the
    layout's bundles, or the engine would place its ranks and attention workers
    beside the group the deployment made for them. None outside any group (the
    offline LLM's driver): the executors then make their own."""
    import ray
    from ray.util.placement_group import get_current_placement_group

    if not ray.is_initialized():
        return None  # a driver that has not started Ray is in no group
    current = get_current_placement_group()
    if current is None:
        return None
    have = len(current.bundle_specs)
    if have != layout.count:
        raise RuntimeError(f"this worker sits in a placement group of {have} bundles, and its engine needs "
                           f"{layout.count}: {layout.tp_size} for tensor_parallel_size {layout.tp_size} and "
                           f"{layout.attention_workers} for attention_offload.workers; the group must be made "
                           f"from the same engine settings (ClusterConfig.worker_bundles)")
    return current
