"""The workers a cluster's previous manager left running, found by name.

Workers and their placement groups are detached, named after the worker id
(`yard-<cluster>-w<n>`), so they outlive a manager that dies. A manager that Ray
restarts adopts them (cluster/manager.py); any other manager removes them. A placement
group whose worker is gone is removed either way: it still holds its bundles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import ray
from ray._raylet import PlacementGroupID
from ray.util.placement_group import PlacementGroup, remove_placement_group

from router.config import MANAGER_NAMESPACE
from workers.events import worker_actor_name

LIVE_GROUP_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def placement_name(worker_id: str) -> str:
    """A worker's placement group: named like its actor."""
    return worker_actor_name(worker_id)


@dataclass(frozen=True, slots=True)
class Orphans:
    workers: dict[str, tuple[Any, PlacementGroup | None]] = field(default_factory=dict)  # id → (actor, its group)
    groups: dict[str, PlacementGroup] = field(default_factory=dict)  # id → a live group without a worker
    next_index: int = 0  # the first worker index no worker or group of this cluster ever had


def find_orphans(cluster_name: str) -> Orphans:
    """The cluster's named workers that are alive, the live groups of workers that are
    not, and the next unused worker index (removed groups count: ids are never reused,
    so a router cannot mistake a new worker for a dead one)."""
    pattern = re.compile(re.escape(worker_actor_name(f"{cluster_name}-w")) + r"(\d+)$")
    actors: dict[str, Any] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        match = pattern.match(entry["name"])
        if match and entry["namespace"] == MANAGER_NAMESPACE:
            try:
                actors[f"{cluster_name}-w{match[1]}"] = ray.get_actor(entry["name"], namespace=MANAGER_NAMESPACE)
            except ValueError:
                pass  # it died since the listing
    groups: dict[str, PlacementGroup] = {}
    highest = -1
    for info in ray.util.placement_group_table().values():
        match = pattern.match(info.get("name") or "")
        if not match:
            continue
        highest = max(highest, int(match[1]))
        if info["state"] in LIVE_GROUP_STATES:
            groups[f"{cluster_name}-w{match[1]}"] = PlacementGroup(PlacementGroupID.from_hex(info["placement_group_id"]))
    indexes = [int(pattern.match(worker_actor_name(wid))[1]) for wid in actors]
    workers = {wid: (handle, groups.pop(wid, None)) for wid, handle in actors.items()}
    return Orphans(workers, groups, max([highest, *indexes]) + 1)


def remove_orphans(orphans: Orphans) -> None:
    """Kill the orphans' workers (their tensor-parallel ranks die with them) and free
    every group."""
    for handle, _ in orphans.workers.values():
        try:
            ray.kill(handle)
        except ray.exceptions.RayError:
            pass  # already gone
    for group in [g for _, g in orphans.workers.values() if g is not None] + list(orphans.groups.values()):
        remove_placement_group(group)
