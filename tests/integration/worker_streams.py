"""What the worker-level migration and handoff tests share: a router's request state
machine over worker links (Follower), requests and their undisturbed outputs, and
the check that workers hold no KV block."""

from __future__ import annotations

import asyncio
import random
from typing import Any, Optional

from router.lifecycle import RequestStream
from router.worker_link import WorkerLink
from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.events import ACTOR_NAMESPACE, Tokens, WorkerRequest, worker_actor_name
from workers.migration import MigrationOrder, MigrationResult
from workers.worker import Worker, WorkerConfig

LONG = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, seed=21, max_tokens=300, ignore_eos=True)


def prompt(seed: int, n: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(4, 1000) for _ in range(n))


def start(ray, worker_id: str, model_dir: str, role: str = "mixed", worker: Optional[dict[str, Any]] = None,
          actor_class: type = Worker, **engine: Any) -> Any:
    """A worker actor, named as the cluster manager names them (so that a prefill
    worker finds its decode worker by id)."""
    config = WorkerConfig(worker_id, EngineConfig(model=model_dir, **{"kv_cache_memory_gib": 0.25, **engine}),
                          role=role, **(worker or {}))
    actor = ray.remote(actor_class).options(num_cpus=0.5, name=worker_actor_name(worker_id),
                                            namespace=ACTOR_NAMESPACE).remote(config)
    ray.get(actor.load.remote())
    return actor


class Follower:
    """What a router replica does for one request: dispatch to `first`, follow Moved."""

    def __init__(self, handles: dict[str, Any], first: str, fallback: Optional[str] = None) -> None:
        self.handles = handles
        self.dispatch = [first] + ([fallback] if fallback else [])
        self.links: dict[str, WorkerLink] = {}
        self.failures: list[str] = []

    def link(self, worker_id: str) -> WorkerLink:
        if worker_id not in self.links:
            self.links[worker_id] = WorkerLink(worker_id, self.handles[worker_id])
        return self.links[worker_id]

    async def run(self, request: WorkerRequest, after_tokens: int, orders: list[MigrationOrder],
                  source: str, then: Any = None) -> tuple[list[Any], list[MigrationResult]]:
        async def report(wid: str) -> None:
            self.failures.append(wid)

        def pick(excluded: frozenset[str]) -> tuple[str, WorkerLink]:
            wid = next(w for w in self.dispatch if w not in excluded)
            return wid, self.link(wid)

        stream = RequestStream(request, pick, lambda link, req, attach: link.stream(req, attach), report, 3,
                               self.link)
        events, pending = [], []
        async for event in stream.events():
            events.append(event)
            if not pending and sum(len(e.token_ids) for e in events if isinstance(e, Tokens)) >= after_tokens:
                pending = [asyncio.ensure_future(self._migrate(source, o)) for o in orders]
                if then is not None:
                    await then()
        results = [await p for p in pending]
        for link in self.links.values():
            link.close()
        self.attempts = stream.attempts
        return events, results

    async def _migrate(self, source: str, order: MigrationOrder) -> Any:
        try:
            return await self.handles[source].migrate.remote(order)
        except Exception as e:  # noqa: BLE001 - the source died: the test looks at it
            return e


def order(handles: dict[str, Any], rid: str, mid: str, dest: str = "dst") -> MigrationOrder:
    return MigrationOrder(mid, rid, dest, handles[dest], "manual")


def tokens(events: list[Any]) -> list[int]:
    out: list[int] = []
    for e in events:
        if isinstance(e, Tokens):
            assert e.start_index == len(out)
            out.extend(e.token_ids)
    return out


def undisturbed(model_dir: str, p: tuple[int, ...], params: SamplingParams) -> list[int]:
    return LLM(model=model_dir, kv_cache_memory_gib=0.25).generate([list(p)], params)[0].token_ids


def assert_all_free(ray, *handles: Any) -> None:
    for h in handles:
        report = ray.get(h.load.remote())
        assert report.free_blocks == report.total_blocks and not report.requests, report.worker_id


def run(coro):
    return asyncio.run(coro)
