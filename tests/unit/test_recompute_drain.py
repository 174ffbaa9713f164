"""Draining workers that cannot move KV: which requests move by recompute, where."""

from __future__ import annotations

from cluster.migration_policy import MigrationConfig, MigrationOrder
from cluster.recompute_drain import DrainCandidate, recompute_drain_orders
from workers.load_report import LoadReport, RequestLoad


def report(worker_id: str, free: int, block_size: int, kv: bool, requests=()) -> LoadReport:
    return LoadReport(worker_id, "mixed", True, len(requests), 0, free, 1000, 0.0, 0.0, frozenset(), 0.0,
                      block_size=block_size, requests=tuple(requests), kv_migration=kv)


def request(rid: str, arrival: float, blocks: int = 1, running: bool = True, recomputable: bool = True):
    return RequestLoad(rid, 0, blocks, arrival, running, False, recomputable)


def candidate(load: LoadReport, serving: bool = True, draining: bool = False, outs: int = 0, ins: int = 0):
    return DrainCandidate(load, serving, draining, outs, ins)


def test_oldest_recomputable_running_requests_go_to_the_most_room_in_tokens():
    source = report("v0", 10, 128, kv=False, requests=[
        request("late", 3.0), request("seeded", 1.0, recomputable=False), request("early", 2.0),
        request("queued", 0.5, blocks=0, running=False)])
    # y0 has more blocks, v1 more tokens (its blocks are 8x larger): v1 wins.
    workers = [candidate(source, serving=False, draining=True),
               candidate(report("y0", 100, 16, kv=True)), candidate(report("v1", 20, 128, kv=False))]
    config = MigrationConfig(max_out_per_worker=2, max_in_per_worker=1)
    assert recompute_drain_orders(workers, set(), config) == [
        MigrationOrder("early", "v0", "v1", "drain"), MigrationOrder("late", "v0", "y0", "drain")]


def test_caps_moving_requests_and_kv_sources_are_left_alone():
    vllm = report("v0", 10, 128, kv=False, requests=[request("a", 1.0), request("b", 2.0)])
    yard = report("y0", 10, 16, kv=True, requests=[request("c", 1.0)])
    dest = report("y1", 500, 16, kv=True)
    config = MigrationConfig(max_out_per_worker=2, max_in_per_worker=4)
    workers = [candidate(vllm, serving=False, draining=True, outs=1), candidate(yard, serving=False, draining=True),
               candidate(dest)]
    # One move out already in flight: one more; "a" is moving: "b" goes; y0 is the KV policy's.
    assert recompute_drain_orders(workers, {"a"}, config) == [MigrationOrder("b", "v0", "y1", "drain")]
    full = [candidate(vllm, serving=False, draining=True), candidate(report("y1", 1, 16, kv=True))]
    assert recompute_drain_orders(full, set(), config) == []  # 128 tokens do not fit 16 (one block kept free)
