"""Serving with and without live migration, where memory runs out first.

Four workers whose KV budgets are small (--kv-blocks each), so that, as on GPUs,
memory and not compute is what a busy worker runs out of. The same open-loop HTTP
load goes to three arms, one after the other in this run:

  (a) round_robin dispatch, no migration
  (b) least_load dispatch (Llumnix's freeness), no migration
  (c) least_load dispatch plus migration (balance and defrag, the default policy)

Arrivals are Poisson and Gamma (CV --cv) at each rate of --rates; prompt and output
lengths come from the Azure 2023 conversation trace, scaled as bench/serving.py
scales them. Per arm and rate: p50/p99 TTFT, p99 TPOT, preemptions (summed over the
workers), migrations committed, output tokens/s.

    python bench/migration_serving.py                       # a few minutes per arm on 2 cores
    python bench/migration_serving.py --rates 2,4 --num-requests 32

Target (issue 9), at the knee: (c)'s p99 TTFT at most 1/5 of (a)'s and 1/2 of (b)'s,
and (c)'s throughput at least 98% of (b)'s. Four workers share two cores here, so
the knee is a CPU knee as much as a memory one: read the ratios, not the rates.
Writes JSON to bench/results/migration-serving-<timestamp>.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

import load_client as lc  # noqa: E402
from environment import environment  # noqa: E402
from workload import special_ids, vocab_size  # noqa: E402

ARMS = {
    "a_round_robin": {"policy": "round_robin", "migration": False},
    "b_least_load": {"policy": "least_load", "migration": False},
    "c_least_load_migration": {"policy": "least_load", "migration": True},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kv-blocks", type=int, default=64, help="KV blocks (of 16 tokens) per worker")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[4.0, 8.0, 12.0])
    p.add_argument("--arrivals", type=lambda s: s.split(","), default=["poisson", "bursty"])
    p.add_argument("--cv", type=float, default=3.0)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--trace", type=Path, default=REPO.parent / "shared" / "traces" / "azure2023_conv.csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS))
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def workload(args: argparse.Namespace, model_dir: Path) -> dict[tuple[str, float], list[lc.RequestSpec]]:
    scaling = lc.LengthScaling()
    lengths = (lc.trace_lengths(args.trace, args.num_requests, args.seed, scaling) if args.trace.is_file()
               else lc.synthetic_lengths(args.num_requests, args.seed, scaling))
    vocab, avoid = vocab_size(model_dir), special_ids(model_dir)
    return {(kind, rate): lc.build_specs(lengths, lc.arrival_times(len(lengths), kind, rate, args.cv, args.seed + k),
                                         vocab, avoid, args.seed + 100)
            for k, kind in enumerate(args.arrivals) for rate in args.rates}


def deploy(arm: str, args: argparse.Namespace, model_dir: Path, port: int) -> tuple[Any, str]:
    from ray import serve

    from router.app import build_app

    name = arm.split("_")[0]
    settings = ARMS[arm]
    migration = ({"enabled": True, "interval_s": 0.2, "max_in_per_worker": 2, "max_out_per_worker": 2}
                 if settings["migration"] else {"enabled": False})
    app = build_app({"cluster": {"name": f"mig-{name}", "num_workers": args.workers, "worker_cpus": 0.25,
                                 "load_poll_interval_s": 0.1, "migration": migration,
                                 "engine": {"model": str(model_dir), "num_kv_blocks": args.kv_blocks,
                                            "max_num_batched_tokens": 512}},
                     "router": {"served_model_name": "tiny-llama", "policy": settings["policy"],
                                "max_queue_per_worker": 100_000, "snapshot_interval_s": 0.05}})
    serve.run(app, name=name, route_prefix=f"/{name}")
    import ray

    manager = ray.get_actor(f"yard-manager-mig-{name}", namespace="yard")
    return manager, f"http://127.0.0.1:{port}/{name}/v1"


def cluster_counts(manager: Any) -> dict[str, int]:
    import ray

    snapshot = ray.get(manager.snapshot.remote())
    status = ray.get(manager.status.remote())
    committed = sum(t["count"] for t in status["migrations"]["totals"] if t["outcome"] == "committed")
    return {"preemptions": sum(s.load.num_preemptions for s in snapshot if s.load), "migrations": committed}


async def one_run(url: str, specs: list[lc.RequestSpec]) -> dict[str, Any]:
    client = lc.HttpClient(url, "tiny-llama")
    outcomes, wall = await lc.run_load(specs, client.send, max_duration_s=600, request_timeout_s=600)
    return lc.summarize(outcomes, wall)


def run_arm(arm: str, args: argparse.Namespace, model_dir: Path, port: int,
            runs: dict[tuple[str, float], list[lc.RequestSpec]]) -> list[dict[str, Any]]:
    import ray
    from ray import serve

    manager, url = deploy(arm, args, model_dir, port)
    rows = []
    try:
        asyncio.run(one_run(url, lc.build_specs([(32, 8)] * 4, [0.0] * 4, vocab_size(model_dir),
                                                special_ids(model_dir), 7)))  # warm up
        for (kind, rate), specs in runs.items():
            before = cluster_counts(manager)
            summary = asyncio.run(one_run(url, specs))
            after = cluster_counts(manager)
            row = {"arm": arm, "arrivals": kind, "rate": rate, **summary,
                   **{k: after[k] - before[k] for k in after}}
            rows.append(row)
            print(format_row(row), flush=True)
    finally:
        serve.delete(arm.split("_")[0])
        ray.get(manager.shutdown.remote())
        ray.kill(manager)
    return rows


HEADER = (f"{'arm':<24}{'arrivals':<9}{'rate':>5}{'ok':>5}{'p50 TTFT ms':>12}{'p99 TTFT ms':>12}"
          f"{'p99 TPOT ms':>12}{'preempt':>8}{'migr':>6}{'out tok/s':>10}")


def format_row(r: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (f"{r['arm']:<24}{r['arrivals']:<9}{r['rate']:>5g}{r['completed']:>5}{f(r['p50_ttft_ms']):>12}"
            f"{f(r['p99_ttft_ms']):>12}{f(r['p99_tpot_ms']):>12}{r['preemptions']:>8}{r['migrations']:>6}"
            f"{f(r['output_throughput']):>10}")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (arrivals, rate): (c) against (a) and (b)."""
    by = {(r["arm"], r["arrivals"], r["rate"]): r for r in rows}
    out = []
    for (arm, kind, rate), c in by.items():
        if arm != "c_least_load_migration":
            continue
        a, b = by.get(("a_round_robin", kind, rate)), by.get(("b_least_load", kind, rate))
        entry = {"arrivals": kind, "rate": rate}
        if a and a["p99_ttft_ms"] and c["p99_ttft_ms"]:
            entry["p99_ttft_c_over_a"] = c["p99_ttft_ms"] / a["p99_ttft_ms"]
        if b and b["p99_ttft_ms"] and c["p99_ttft_ms"]:
            entry["p99_ttft_c_over_b"] = c["p99_ttft_ms"] / b["p99_ttft_ms"]
        if b and b["output_throughput"] and c["output_throughput"]:
            entry["throughput_c_over_b"] = c["output_throughput"] / b["output_throughput"]
        out.append(entry)
    return out


def main() -> int:
    args = parse_args()
    import ray
    from ray import serve

    from cluster.serve_env import STREAMING_SERVE_ENV, apply_serve_env
    from cluster.serving import free_port
    from workers.models.tiny import resolve_model

    model_dir = Path(resolve_model(args.model))
    runs = workload(args, model_dir)
    apply_serve_env(STREAMING_SERVE_ENV)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"{args.workers} workers x {args.kv_blocks} KV blocks, {args.model}, {args.num_requests} requests per run, "
          f"lengths from {args.trace.name if args.trace.is_file() else 'a synthetic log-normal'}; "
          f"four workers share two cores")
    print(HEADER)
    rows: list[dict[str, Any]] = []
    try:
        for arm in args.arms:
            rows.extend(run_arm(arm, args, model_dir, port, runs))
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"environment": environment("torch", "ray"),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "ratios": ratios(rows)}
    print(json.dumps(result["ratios"], indent=2))
    path = args.json or BENCH / "results" / f"migration-serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
