"""Draining a worker whose engine cannot move KV (vLLM's): its running requests move
by recompute (workers/recompute_move.py) to the workers with the most room, within
the migration caps. The KV migration policy (cluster/migration_policy.py) plans for
the other workers; this plans only for these sources.

Pure Python: load reports in, orders out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AbstractSet, Sequence

from cluster.migration_policy import MigrationConfig, MigrationOrder

if TYPE_CHECKING:
    from workers.load_report import LoadReport


@dataclass(frozen=True, slots=True)
class DrainCandidate:
    """A worker as this planner sees it."""

    load: "LoadReport"
    serving: bool  # healthy, booted, not draining, mixed role: may take requests
    draining: bool
    outs: int  # migrations in flight out of it
    ins: int


def recompute_drain_orders(workers: Sequence[DrainCandidate], moving: AbstractSet[str],
                           config: MigrationConfig) -> list[MigrationOrder]:
    """Orders that move the running, recomputable requests of draining workers
    without KV to the serving workers with the most free KV room; oldest first. Room
    is counted in tokens: two engines may use different block sizes."""
    ins = {w.load.worker_id: w.ins for w in workers}
    free = {w.load.worker_id: w.load.free_blocks * w.load.block_size for w in workers}
    reserve = {w.load.worker_id: config.reserve_blocks * w.load.block_size for w in workers}
    orders = []
    for source in sorted((w for w in workers if w.draining and not w.load.kv_migration),
                         key=lambda w: w.load.worker_id):
        outs = source.outs
        for request in sorted(source.load.requests, key=lambda r: (r.arrival_time, r.request_id)):
            if outs >= config.max_out_per_worker:
                break
            if not request.running or not request.recomputable or request.request_id in moving:
                continue
            tokens = request.num_blocks * source.load.block_size
            room = [w.load.worker_id for w in workers if w.serving and w is not source
                    and ins[w.load.worker_id] < config.max_in_per_worker
                    and free[w.load.worker_id] - tokens >= reserve[w.load.worker_id]]
            if not room:
                break
            destination = max(room, key=lambda wid: (free[wid], wid))
            orders.append(MigrationOrder(request.request_id, source.load.worker_id, destination, "drain"))
            ins[destination] += 1
            free[destination] -= tokens
            outs += 1
    return orders
