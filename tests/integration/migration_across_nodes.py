"""Run by test_migration_nodes.py in a process of its own (it needs a Ray cluster of
two nodes, not the session's local Ray): a request migrates from a worker on one node
to a worker on another, through the object store, and ends exactly like an
undisturbed run. Prints one JSON line with what it saw."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

import ray
from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster

from router.lifecycle import RequestStream
from router.worker_link import WorkerLink
from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.events import Tokens, WorkerRequest
from workers.migration import MigrationOrder
from workers.worker import Worker, WorkerConfig


class NodeWorker(Worker):
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


async def follow_and_move(handles: dict, request: WorkerRequest) -> tuple[list[int], object, list]:
    links = {wid: WorkerLink(wid, h) for wid, h in handles.items()}

    async def report(_: str) -> None:
        pass

    stream = RequestStream(request, lambda excluded: ("a", links["a"]),
                           lambda link, req, attach: link.stream(req, attach), report, 3, links.__getitem__)
    tokens: list[int] = []
    migration = None
    async for event in stream.events():
        if isinstance(event, Tokens):
            assert event.start_index == len(tokens)
            tokens.extend(event.token_ids)
            if migration is None and len(tokens) >= 10:
                order = MigrationOrder("m-nodes", request.request_id, "b", handles["b"], "manual")
                migration = asyncio.ensure_future(handles["a"].migrate.remote(order))
    result = await migration
    for link in links.values():
        link.close()
    return tokens, result, [(a.worker_id, a.moved_in) for a in stream.attempts]


def main(model_dir: str) -> None:
    # Cluster writes its address where `ray.init(address="auto")` looks; put back
    # whatever was there, so that no other Ray user on the machine finds ours.
    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    try:
        run(model_dir)
    finally:
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)


def run(model_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        actor = ray.remote(NodeWorker)
        handles = {wid: actor.options(num_cpus=0.5, resources={f"node_{wid}": 1}).remote(
            WorkerConfig(wid, EngineConfig(model=model_dir, kv_cache_memory_gib=0.25))) for wid in ("a", "b")}
        nodes = ray.get([h.node_id.remote() for h in handles.values()])
        rng = random.Random(3)
        prompt = tuple(rng.randrange(4, 1000) for _ in range(60))
        params = SamplingParams(temperature=0.8, seed=9, max_tokens=200, ignore_eos=True)
        want = LLM(model=model_dir, kv_cache_memory_gib=0.25).generate([list(prompt)], params)[0].token_ids
        tokens, result, attempts = asyncio.run(follow_and_move(handles, WorkerRequest("r", prompt, params)))
        loads = ray.get([h.load.remote() for h in handles.values()])
        print(json.dumps({"nodes": nodes, "committed": result.committed, "error": result.error,
                          "blocks": result.blocks, "exact": tokens == want, "num_tokens": len(tokens),
                          "attempts": attempts, "all_free": all(l.free_blocks == l.total_blocks for l in loads)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
