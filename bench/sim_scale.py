"""How fast the simulator runs as the cluster grows: simulated requests per second of
wall time against the number of workers, at a load per worker held constant.

The Azure 2023 conversation trace, repeated end to end as often as needed, its
arrivals compressed so that each worker gets --rate-per-worker requests per second,
its lengths divided by --length-divisor; --requests-per-worker requests per worker.
Colocated workers, least-load dispatch, migration on or off (--migration). The step
times come from a step-time model file (--step-time, as yard profile writes), or a
built-in one of this machine's tiny-llama (its base cost, per-token and per-request
costs in round numbers).

    python bench/sim_scale.py --workers 4,16,64,256
    python bench/sim_scale.py --workers 1000 --requests-per-worker 1000   # issue 16's target: 1,000,000 requests

Target (issue 16): 1,000 workers and 1,000,000 requests in under 10 minutes on this
2-core machine. Writes JSON to bench/results/sim-scale-<timestamp>.json (or --json).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

from environment import environment, write_results  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64, 256])
    p.add_argument("--requests-per-worker", type=int, default=200)
    p.add_argument("--rate-per-worker", type=float, default=1.0)
    p.add_argument("--length-divisor", type=int, default=4)
    p.add_argument("--migration", action="store_true")
    p.add_argument("--step-time", type=Path, default=None)
    p.add_argument("--trace", type=Path, default=REPO.parent / "shared" / "traces" / "azure2023_conv.csv")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def step_model(path: Path | None) -> Any:
    from cluster.sim.step_time import StepTimeModel

    if path is not None:
        return StepTimeModel.load(path)
    # tiny-llama on one core of this machine, rounded (yard profile measures ~5-10 ms a
    # step, ~0.1 ms a prompt token, ~0.1-0.2 ms a decoding request).
    return StepTimeModel(0.006, 1e-4, 5e-8, 1.5e-4, 8e-7, model="tiny-llama", kv_block_bytes=65536,
                         max_position_embeddings=2048, transfer_bytes_per_s=5e8)


def tiled_trace(path: Path, n: int, rate: float, divisor: int) -> list[Any]:
    """n requests: the trace repeated, arrivals at `rate` per second on average."""
    from cluster.sim.trace import TraceRequest

    with path.open(newline="") as f:
        rows = [(float(r["arrived_at"]), int(r["num_prefill_tokens"]), int(r["num_decode_tokens"]))
                for r in csv.DictReader(f)]
    span = rows[-1][0] + (rows[-1][0] - rows[0][0]) / len(rows)  # one pass, plus a mean gap
    stretch = len(rows) / span / rate  # the trace's rate over the one asked for
    out = []
    for i in range(n):
        t, prompt, output = rows[i % len(rows)]
        out.append(TraceRequest(i, ((i // len(rows)) * span + t) * stretch, min(max(1, prompt // divisor), 2000),
                                max(1, output // divisor)))
    return out


def main() -> int:
    args = parse_args()
    from cluster.config import ClusterConfig
    from cluster.sim.cluster import Simulation
    from router.config import RouterConfig

    timing = step_model(args.step_time)
    rows = []
    print(f"{'workers':>8}{'requests':>10}{'simulated s':>13}{'wall s':>9}{'req/s':>9}{'events/s':>10}"
          f"{'p50 TTFT ms':>13}{'p50 TPOT ms':>13}")
    for workers in args.workers:
        n = workers * args.requests_per_worker
        trace = tiled_trace(args.trace, n, workers * args.rate_per_worker, args.length_divisor)
        cluster = ClusterConfig.from_dict({"num_workers": workers, "engine": {"num_kv_blocks": 2048},
                                           "migration": {"enabled": args.migration}})
        started = time.perf_counter()
        result = Simulation(cluster, RouterConfig(policy="least_load", max_queue_per_worker=1_000_000), timing,
                            trace).run()
        wall = time.perf_counter() - started
        summary = result.summary()
        row = {"workers": workers, "requests": n, "simulated_s": summary["simulated_s"], "wall_s": wall,
               "requests_per_wall_s": n / wall, "events_per_wall_s": result.events / wall,
               "ok": summary["statuses"]["ok"], "p50_ttft_s": summary["ttft_s"]["p50"],
               "p50_tpot_s": summary["tpot_s"]["p50"]}
        rows.append(row)
        print(f"{workers:>8}{n:>10}{row['simulated_s']:>13.1f}{wall:>9.1f}{n / wall:>9.0f}"
              f"{result.events / wall:>10.0f}{row['p50_ttft_s'] * 1000:>13.1f}{row['p50_tpot_s'] * 1000:>13.2f}",
              flush=True)
    write_results({"environment": environment(), "step_time": vars(timing),
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "rows": rows}, "sim-scale", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
