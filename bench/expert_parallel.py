"""Expert parallelism at run time, on the tiny-moe-affinity model (16 experts, 6 layers,
top-2; skewed, layer-to-layer correlated routing):

1. Decode step time and tokens/s: EP=2 against EP=1 (one rank) and against TP=2 (the
   experts split on their intermediate dim), the same workload in one run. Each rank
   is pinned to its own core with one torch thread (rank 0 here, rank 1 a Ray actor),
   so that the layouts do not share compute.
2. Cross-rank pairs and balance as the runtime counts them (the all-to-all's split
   sizes), for each placement policy at EP=4 with 25% redundant slots: the policies
   place from the routing of a first workload and are measured on a second.
3. Live re-placement under a decoding batch (EP=2): its wall time, the steps it
   delayed, and those steps' time against the others'.

    python bench/expert_parallel.py
    python bench/expert_parallel.py --num-prompts 64 --json out.json

Writes JSON to bench/results/expert_parallel-<timestamp>.json (or --json PATH).
"""

from __future__ import annotations

import argparse
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

from environment import environment, write_results  # noqa: E402
from pinning import pin, pin_actor  # noqa: E402

MODEL = "tiny-moe-affinity"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def pin_ranks(engine: Any) -> None:
    """Rank 0 (this process) on core 0, rank r on core r, one torch thread each."""
    import torch

    pin(os.getpid(), 0)
    torch.set_num_threads(1)
    for core, rank in enumerate(engine.tp_ranks, start=1):
        pin_actor(rank, core % os.cpu_count())


def prompts(args: argparse.Namespace, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(7, 1000) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]


def engine_for(tp: int, ep: int, **extra: Any) -> Any:
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model=MODEL, dtype="float32", tensor_parallel_size=tp, expert_parallel_size=ep,
                                  tp_cpus_per_rank=0.5, max_num_batched_tokens=4096, **extra))


def decode(engine: Any, tokens: list[list[int]], output_len: int, on_step: Any = None) -> dict[str, Any]:
    """Prefill everything, then time each decode step (the batch is every prompt)."""
    from workers import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, t in enumerate(tokens):
        engine.add_request(f"r{i}", t, params)
    while engine.scheduler.waiting or any(r.seq.num_uncomputed_tokens > 1 for r in engine.requests.values()):
        engine.step()
    steps, generated = [], 0
    while engine.has_unfinished_requests():
        if on_step is not None:
            on_step(len(steps))
        start = time.perf_counter()
        generated += sum(len(o.new_token_ids) for o in engine.step())
        steps.append(time.perf_counter() - start)
    return {"steps": steps, "generated": generated}


def step_times(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, tp, ep in (("EP=1 (one rank)", 1, 1), ("TP=2, experts split", 2, 1), ("EP=2", 2, 2)):
        engine = engine_for(tp, ep)
        try:
            pin_ranks(engine)
            run = decode(engine, prompts(args, 1), args.output_len)
        finally:
            engine.shutdown()
        median = statistics.median(run["steps"])
        rows.append({"layout": name, "tp": tp, "ep": ep, "cores": tp, "median_step_ms": median * 1000,
                     "tokens_per_s": run["generated"] / sum(run["steps"])})
    base = rows[0]
    print(f"\n1. decode, batch {args.num_prompts}, {args.prompt_len} in / {args.output_len} out; each rank pinned to "
          f"its own core, one torch thread")
    print(f"{'layout':>22}{'cores':>7}{'median step ms':>16}{'tokens/s':>10}{'vs EP=1':>9}")
    for r in rows:
        r["tokens_per_s_vs_ep1"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{r['layout']:>22}{r['cores']:>7}{r['median_step_ms']:>16.2f}{r['tokens_per_s']:>10.0f}"
              f"{r['tokens_per_s_vs_ep1']:>9.2f}")
    return rows


def routing_of_a_workload(args: argparse.Namespace) -> Any:
    engine = engine_for(1, 1)
    try:
        engine.runner.model.routing.take()
        decode(engine, prompts(args, 2), args.output_len)
        return engine.runner.model.routing.take()
    finally:
        engine.shutdown()


def runtime_traffic(args: argparse.Namespace, stats: Any, tmp: Path) -> list[dict[str, Any]]:
    import json

    from workers.experts.policies import POLICIES, PlacementShape, place_experts

    rows = []
    print("\n2. EP=4, 5 slots per rank (25% redundant): pairs counted by the all-to-all, on a second workload")
    print(f"{'policy':>12}{'cross-rank share':>18}{'vs contiguous':>15}{'max/mean (worst layer)':>24}")
    for name in POLICIES:
        table = place_experts(name, stats, PlacementShape(4, 5))
        path = tmp / f"table-{name}.json"
        path.write_text(json.dumps(table.to_dict()))
        engine = engine_for(4, 4, expert_placement=str(path))
        try:
            engine.runner.model.dispatch_counts.take()
            decode(engine, prompts(args, 3), args.output_len)
            moved = engine.runner.model.dispatch_counts.take()
        finally:
            engine.shutdown()
        pairs = sum(sum(map(sum, m)) for m in moved)
        crossed = pairs - sum(m[r][r] for m in moved for r in range(4))
        worst = max(max(served) / (sum(served) / 4)
                    for served in ([sum(m[s][d] for s in range(4)) for d in range(4)] for m in moved))
        rows.append({"policy": name, "pairs": pairs, "cross_rank": crossed, "cross_rank_share": crossed / pairs,
                     "max_over_mean_worst_layer": worst})
    for r in rows:
        r["cross_rank_vs_contiguous"] = r["cross_rank"] / rows[0]["cross_rank"]
        print(f"{r['policy']:>12}{r['cross_rank_share']:>18.1%}{r['cross_rank_vs_contiguous']:>15.2f}"
              f"{r['max_over_mean_worst_layer']:>24.3f}")
    return rows


def replacement(args: argparse.Namespace, stats: Any) -> dict[str, Any]:
    from workers.experts.policies import PlacementShape, place_experts

    engine = engine_for(2, 2, expert_slots_per_rank=10)
    new = place_experts("combined", stats, PlacementShape(2, 10))
    began: list[int] = []

    def move_at_step(step: int) -> None:
        if step == 8:
            engine.replace_experts(new)
            began.append(step)

    try:
        pin_ranks(engine)
        run = decode(engine, prompts(args, 4), args.output_len, move_at_step)
        [result] = engine.expert_moves.results
    finally:
        engine.shutdown()
    start = began[0]
    delayed = run["steps"][start:start + result.steps_delayed]
    others = run["steps"][:start] + run["steps"][start + result.steps_delayed + 1:]
    row = {"outcome": result.outcome, "seconds": result.seconds, "layers_moved": result.layers_moved,
           "steps_delayed": result.steps_delayed, "delayed_step_ms": statistics.median(delayed) * 1000,
           "other_step_ms": statistics.median(others) * 1000}
    print(f"\n3. live re-placement, contiguous to combined, EP=2 x 10 slots, under a batch of {args.num_prompts}: "
          f"{row['outcome']} in {row['seconds'] * 1000:.0f} ms, {row['layers_moved']} layers, "
          f"{row['steps_delayed']} steps delayed; a delayed step {row['delayed_step_ms']:.2f} ms against "
          f"{row['other_step_ms']:.2f} ms")
    return row


def main() -> int:
    import tempfile

    import ray

    args = parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        stats = routing_of_a_workload(args)
        rows = step_times(args)
        with tempfile.TemporaryDirectory() as tmp:
            traffic = runtime_traffic(args, stats, Path(tmp))
        moved = replacement(args, stats)
    finally:
        ray.shutdown()
    write_results({"environment": environment(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(args).items()},
                   "step_times": rows, "runtime_traffic": traffic, "replacement": moved}, "expert_parallel",
                  args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
