"""Fault injection under load: streaming requests over gRPC while one part of the
service is killed, then the books of every stream against an undisturbed run.

Faults (--fault, or each in turn):

* worker: the worker actor running the most requests (rank 0 of its TP group) dies;
* tp_rank: another tensor-parallel rank of the busiest worker dies;
* manager: the cluster manager actor dies (Ray restarts it; it adopts the workers);
* router: a router replica dies (Serve starts another).

Most streams are gRPC; a few (--http-streams) are streamed completions over HTTP,
whose text must equal the undisturbed run's, or end with an error (an error event, a
broken connection) with the text so far a prefix of it: never a clean [DONE] short.

Every stream keeps its tokens by absolute index (GenerateResponse.start_index): a
token that comes twice is duplicated, an index that never comes is lost, and a token
unlike the undisturbed run's (the offline engine, same prompt and seed) is wrong.
Target: 0 of each, except on the streams of a killed router replica, which must end
with a gRPC error: never a clean end short of max_tokens. Afterwards no worker holds
a KV block (held_blocks).

    python bench/faults.py                  # its own local cluster (TP=2 workers, 2 replicas)
    python bench/faults.py --fault manager --streams 64

The suite runs every fault against a cluster of its own (tests/e2e/test_faults.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

FAULTS = ("worker", "tp_rank", "manager", "router")


@dataclass(frozen=True, slots=True)
class StreamSpec:
    request_id: str
    prompt: tuple[int, ...]
    sampling: dict[str, Any]  # SamplingParams fields, the same for gRPC and the offline engine
    expected: tuple[int, ...] = ()  # the undisturbed run's tokens
    expected_text: str = ""
    http: bool = False  # streamed over HTTP (text) rather than gRPC (token ids)


@dataclass(slots=True)
class StreamBook:
    """What one stream received, by absolute output index."""

    tokens: dict[int, int] = field(default_factory=dict)
    duplicated: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None  # the gRPC status and details, if the call failed
    text: str = ""  # an HTTP stream's text, its chunks, and its [DONE]
    chunks: int = 0
    done: bool = False

    def add(self, start_index: int, token_ids: list[int]) -> None:
        for i, token in enumerate(token_ids, start_index):
            if i in self.tokens:
                self.duplicated += 1
            else:
                self.tokens[i] = token


def workload(model_dir: str, streams: int, max_tokens: int, seed: int, tag: str, http_streams: int = 0
             ) -> list[StreamSpec]:
    """`streams` prompts of random token ids, half greedy and half seeded sampling,
    with the offline engine's output for each (the undisturbed run); the last
    `http_streams` of them go over HTTP."""
    from workers import LLM, SamplingParams

    rng = random.Random(seed)
    specs = []
    for i in range(streams):
        prompt = tuple(rng.randrange(3, 500) for _ in range(rng.randrange(8, 48)))
        sampling = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
        if i % 2:
            sampling.update(temperature=0.8, top_p=0.95, seed=rng.randrange(10**6))
        specs.append(StreamSpec(f"{tag}-{i}", prompt, sampling))
    llm = LLM(model=model_dir)
    try:
        outputs = llm.generate([list(s.prompt) for s in specs], [SamplingParams(**s.sampling) for s in specs])
    finally:
        llm.close()
    return [StreamSpec(s.request_id, s.prompt, s.sampling, tuple(o.token_ids), o.text, i >= streams - http_streams)
            for i, (s, o) in enumerate(zip(specs, outputs))]


async def _stream(stub: Any, pb2: Any, app: str, spec: StreamSpec, book: StreamBook) -> None:
    import grpc

    request = pb2.GenerateRequest(model="tiny-llama", token_ids=pb2.TokenIds(ids=list(spec.prompt)),
                                  sampling=pb2.SamplingParams(**spec.sampling), request_id=spec.request_id)
    try:
        async for response in stub.Generate(request, metadata=(("application", app),), timeout=600):
            book.add(response.start_index, list(response.token_ids))
            if response.HasField("finish_reason"):
                book.finish_reason = response.finish_reason
    except grpc.aio.AioRpcError as e:
        book.error = f"{e.code().name}: {e.details()}"


async def _http_stream(base_url: str, spec: StreamSpec, book: StreamBook) -> None:
    """An HTTP stream's text, [DONE], and any failure (an error event, a broken
    connection, a non-200 status) as the error."""
    from sse_client import post_lines  # bench/sse_client.py

    payload = {"model": "tiny-llama", "prompt": list(spec.prompt), "stream": True, **spec.sampling}
    try:
        async for line in post_lines(f"{base_url}/v1/completions", payload):
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                book.done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                book.error = f"error event: {event['error'].get('message')}"
                continue
            for choice in event.get("choices", []):
                book.text += choice.get("text") or ""
                book.chunks += 1
                book.finish_reason = choice.get("finish_reason") or book.finish_reason
    except Exception as e:  # noqa: BLE001 - how the stream broke is the finding
        book.error = book.error or f"{type(e).__name__}: {e}"


async def run_streams(target: str, app: str, specs: list[StreamSpec], fault: Callable[[], Any],
                      started_tokens: int = 4, http_base: str = "") -> tuple[list[StreamBook], Any]:
    """Stream every spec at once; when each stream has `started_tokens` tokens (every
    request is mid-flight) run `fault` on a thread; return the books and what the fault
    returned."""
    import grpc

    from router.grpc_stubs import load

    stubs = load()
    books = [StreamBook() for _ in specs]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = stubs.pb2_grpc.YardStub(channel)
        tasks = [asyncio.ensure_future(_http_stream(http_base, s, b) if s.http else _stream(stub, stubs.pb2, app, s, b))
                 for s, b in zip(specs, books)]
        while not all((b.chunks if s.http else len(b.tokens)) >= started_tokens or b.error or b.finish_reason
                      for s, b in zip(specs, books)):
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        injected = await asyncio.get_running_loop().run_in_executor(None, fault)
        await asyncio.gather(*tasks)
    return books, injected


def tally(specs: list[StreamSpec], books: list[StreamBook]) -> dict[str, Any]:
    """Per fault run: tokens lost, duplicated and wrong over the streams that ended
    normally; streams that ended with an error, and how many tokens they had."""
    out = {"streams": sum(not s.http for s in specs), "tokens_expected": 0, "tokens_received": 0, "lost": 0, "duplicated": 0,
           "wrong": 0, "clean_short_ends": 0, "errored_streams": 0, "errored_wrong": 0, "errors": []}
    out.update(http_streams=0, http_whole=0, http_errored=0, http_wrong=0, http_clean_short_ends=0, http_errors=[])
    for spec, book in zip(specs, books):
        if spec.http:
            _tally_http(out, spec, book)
            continue
        wrong = sum(book.tokens[i] != t for i, t in enumerate(spec.expected) if i in book.tokens)
        wrong += sum(i >= len(spec.expected) for i in book.tokens)
        out["duplicated"] += book.duplicated
        out["tokens_received"] += len(book.tokens) + book.duplicated
        if book.error is not None:
            out["errored_streams"] += 1
            out["errored_wrong"] += wrong  # a cut stream's tokens must still be right
            out["errors"].append(book.error)
            continue
        out["tokens_expected"] += len(spec.expected)
        out["lost"] += sum(i not in book.tokens for i in range(len(spec.expected)))
        out["wrong"] += wrong
        if book.finish_reason != "length" or len(book.tokens) < len(spec.expected):
            out["clean_short_ends"] += 1
    out["errors"] = sorted(set(out["errors"]))[:8]
    out["http_errors"] = sorted(set(out["http_errors"]))[:8]
    return out


def _tally_http(out: dict[str, Any], spec: StreamSpec, book: StreamBook) -> None:
    """An HTTP stream ends whole ([DONE], the undisturbed text) or with an error, its
    text so far a prefix of the undisturbed one; never a clean end short of it."""
    out["http_streams"] += 1
    if book.error is not None:
        out["http_errored"] += 1
        out["http_wrong"] += not spec.expected_text.startswith(book.text)
        out["http_errors"].append(book.error[:160])
    elif book.done and book.finish_reason == "length" and book.text == spec.expected_text:
        out["http_whole"] += 1
    elif spec.expected_text.startswith(book.text):
        out["http_clean_short_ends"] += 1
    else:
        out["http_wrong"] += 1


# -- the faults --------------------------------------------------------------------------------
def busiest_worker(manager: Any) -> Any:
    import ray

    # Healthy or not: on a loaded 2-core machine a poll may time out for a moment.
    snapshot = ray.get(manager.snapshot.remote())
    loads = [s for s in snapshot if s.load is not None]
    if not loads:
        raise RuntimeError(f"no worker to kill: {[(s.worker_id, s.healthy, s.load) for s in snapshot]}")
    return max(loads, key=lambda s: (s.load.num_running + s.load.num_waiting, s.healthy))


def kill_worker(manager: Any) -> str:
    import ray

    victim = busiest_worker(manager)
    ray.kill(victim.handle, no_restart=True)
    return victim.worker_id


def kill_tp_rank(manager: Any) -> str:
    import ray

    victim = busiest_worker(manager)

    def other_ranks(worker: Any) -> list:  # runs in the worker actor: a local function travels by value
        return worker.engine.tp_ranks

    ranks = ray.get(victim.handle.__ray_call__.remote(other_ranks))
    if not ranks:
        raise RuntimeError(f"worker {victim.worker_id} has no other tensor-parallel rank to kill")
    ray.kill(ranks[-1], no_restart=True)
    return f"{victim.worker_id} rank {len(ranks)}"


def kill_manager(manager: Any) -> str:
    import ray

    ray.kill(manager, no_restart=False)  # as a crash: Ray restarts it
    return "manager"


def kill_router_replica(app: str) -> str:
    import ray

    replicas = router_replicas(app)
    if len(replicas) < 2:
        raise RuntimeError(f"app {app!r} runs {len(replicas)} router replica(s); killing one needs two")
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    return replicas[0]


def inject(fault: str, manager: Any, app: str) -> Callable[[], str]:
    return {"worker": lambda: kill_worker(manager), "tp_rank": lambda: kill_tp_rank(manager),
            "manager": lambda: kill_manager(manager), "router": lambda: kill_router_replica(app)}[fault]


def router_replicas(app: str) -> list[str]:
    """The names of the app's live router replica actors."""
    from ray._private.state import actors

    return sorted(a["Name"] for a in actors().values()
                  if a.get("State") == "ALIVE" and a.get("ActorClassName") == f"ServeReplica:{app}:router")


def wait_recovered(manager: Any, app: str, num_workers: int, replicas: int, victim: str,
                   timeout_s: float = 180) -> float:
    """Seconds until the cluster serves at full strength again: every worker healthy
    and every router replica running, the victim no longer among them."""
    import ray
    from ray import serve

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        workers = [s for s in ray.get(manager.snapshot.remote()) if s.healthy and s.worker_id != victim.split()[0]]
        deployment = serve.status().applications[app].deployments["router"]
        running = deployment.replica_states.get("RUNNING", 0)
        alive = router_replicas(app)
        if (len(workers) == num_workers and running == replicas == len(alive) and victim not in alive
                and deployment.status == "HEALTHY"):
            return time.monotonic() - start
        time.sleep(0.2)
    raise TimeoutError(f"the cluster did not recover within {timeout_s:g} s: {len(workers)}/{num_workers} "
                       f"workers healthy, {running}/{replicas} router replicas running")


def run_fault(fault: str, target: str, app: str, manager: Any, specs: list[StreamSpec], num_workers: int,
              replicas: int, http_base: str = "") -> dict[str, Any]:
    """One fault under the streams (gRPC at `target`; HTTP at `http_base`, the app's
    route, for specs marked http); the books, then the time to full strength."""
    from soak import books as kv_books  # bench/soak.py: held KV blocks once the workers settle

    start = time.monotonic()
    books, victim = asyncio.run(run_streams(target, app, specs, inject(fault, manager, app), http_base=http_base))
    ended_at = time.time()
    report = {"fault": fault, "victim": victim, **tally(specs, books), "streams_s": round(time.monotonic() - start, 1)}
    report["recovered_s"] = round(wait_recovered(manager, app, num_workers, replicas, victim), 1)
    report["held_blocks"] = {wid: w["held_blocks"] for wid, w in kv_books(manager, ended_at).items()}
    return report


def main() -> None:
    from environment import write_results  # bench/environment.py

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=FAULTS, action="append", help="default: each in turn")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--http-streams", type=int, default=8, help="of --streams, how many go over HTTP")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from cluster.serving import free_port, start, stop
    from workers.models.tiny import resolve_model

    config = {"cluster": {"name": "faults", "num_workers": 2, "worker_cpus": 0.5,
                          "engine": {"model": "tiny-llama", "tensor_parallel_size": 2, "tp_cpus_per_rank": 0.5}},
              "router": {"served_model_name": "tiny-llama", "max_queue_per_worker": 256},
              "replicas": 2, "router_cpus": 0.25,
              "http": {"host": "127.0.0.1", "port": free_port()}, "grpc": {"port": free_port()}}
    endpoints = start(config)
    reports = []
    try:
        manager = ray.get_actor("yard-manager-faults", namespace="yard")
        for i, fault in enumerate(args.fault or FAULTS):
            specs = workload(resolve_model("tiny-llama"), args.streams, args.max_tokens, seed=i, tag=f"{fault}-{i}",
                             http_streams=args.http_streams)
            reports.append(run_fault(fault, endpoints["grpc"], "yard", manager, specs, 2, 2,
                                     http_base=endpoints["http"].removesuffix("/v1")))
            print(json.dumps(reports[-1]), flush=True)
    finally:
        stop(config)
    write_results(reports, "faults", args.json)


if __name__ == "__main__":
    main()
