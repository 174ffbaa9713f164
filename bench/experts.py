"""Expert placement policies on realistic routing: cross-rank tokens per layer and
balance, for contiguous, balanced (EPLB), affinity (ExFlow) and combined placements.

The routing is recorded from the tiny-moe-affinity model (workers/models/
affinity_routing.py: hot experts, strong layer-to-layer affinity) run by our engine's
model over the tokenized tiny corpus (the trace-driven workload), or read from a
routing trace file (--trace: JSON lines, one token per line, [layer][k] -> expert;
--save-trace writes one). Each policy places from the statistics of the first half
of the tokens; the figures are measured token by token on the second half
(workers/experts/traffic.py: ExFlow's model, a token sits on the rank of its first
choice between layers).

    python bench/experts.py
    python bench/experts.py --trace routing.jsonl --ranks 8 --ranks-per-node 4

Targets (issue 14): affinity's cross-rank tokens at least 50% below contiguous's;
balancedness (max over mean tokens per rank) at most 1.1 with 25% redundant slots.
The runtime's figures (step time EP=2 against EP=1, the all-to-all's own cross-rank
counts, live re-placement) are bench/expert_parallel.py's. Writes JSON to
bench/results/experts-<timestamp>.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

from environment import environment, write_results  # noqa: E402

from workers.experts.policies import POLICIES, PlacementShape, place_experts  # noqa: E402
from workers.experts.stats import RoutingStats  # noqa: E402
from workers.experts.traffic import balancedness, cross_rank_tokens  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=None, help="a routing trace (JSON lines) instead of the model")
    p.add_argument("--save-trace", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the corpus to route (model only)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--redundant", type=float, default=0.25, help="extra slots, as a share of the experts")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def model_routing(num_tokens: int) -> tuple[list[list[list[int]]], int]:
    """[token][layer] -> top-k, from the affinity model over the tokenized corpus, in
    prefill forwards of 512 tokens."""
    import torch

    from workers.engine.block_manager import BlockManager
    from workers.engine.model_runner import ModelRunner
    from workers.engine.sequence import Sequence
    from workers.models.registry import load_model
    from workers.models.tiny import CORPUS_PATH, build_tokenizer, resolve_model
    from workers.sampling_params import SamplingParams

    torch.set_num_threads(1)
    cfg, model = load_model(resolve_model("tiny-moe-affinity"))
    ids = build_tokenizer().encode(CORPUS_PATH.read_text(encoding="utf-8")).ids
    ids = (ids * (num_tokens // len(ids) + 1))[:num_tokens]
    runner = ModelRunner(cfg, model, 64, 16)
    model.routing.keep_choices()
    for start in range(0, len(ids), 512):
        chunk = ids[start:start + 512]
        blocks = BlockManager(64, 16)
        seq = Sequence(f"c{start}", chunk, len(chunk), SamplingParams(), max_tokens=1)
        blocks.grow(seq, len(chunk))
        runner.execute([(seq, len(chunk))])
    assert model.routing.choices is not None
    tokens = [list(token) for forward in model.routing.choices for token in zip(*forward)]
    return tokens, cfg.num_experts


def read_trace(path: Path) -> tuple[list[list[list[int]]], int]:
    tokens = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            token = json.loads(line)
            if not (isinstance(token, list) and token and all(isinstance(c, list) and c for c in token)):
                raise ValueError("a token is a list of layers, each a non-empty list of experts")
        except ValueError as e:
            raise SystemExit(f"{path}:{n}: not a routing trace line ({e})")
        tokens.append(token)
    num_experts = 1 + max(e for token in tokens for layer in token for e in layer)
    return tokens, num_experts


def by_layer(tokens: list[list[list[int]]]) -> list[list[list[int]]]:
    return [list(layer) for layer in zip(*tokens)]


def main() -> int:
    args = parse_args()
    started = time.perf_counter()
    tokens, num_experts = read_trace(args.trace) if args.trace else model_routing(args.tokens)
    if args.save_trace:
        args.save_trace.write_text("".join(json.dumps(t) + "\n" for t in tokens))
    half = len(tokens) // 2
    fit, held_out = RoutingStats.count(by_layer(tokens[:half]), num_experts), by_layer(tokens[half:])
    measured = RoutingStats.count(held_out, num_experts)
    print(f"{len(tokens)} tokens ({'trace ' + str(args.trace) if args.trace else 'tiny-moe-affinity'}), "
          f"{num_experts} experts, {measured.num_layers} layers; routed in {time.perf_counter() - started:.1f} s; "
          f"placed from the first half, measured on the second")
    rows = []
    redundant_slots = round(args.redundant * num_experts / args.ranks) * args.ranks
    for extra in sorted({0, redundant_slots}):
        shape = PlacementShape(args.ranks, (num_experts + extra) // args.ranks, args.ranks_per_node)
        print(f"\n{args.ranks} ranks x {shape.slots_per_rank} slots ({extra} redundant)")
        print(f"{'policy':>12}{'cross-rank tokens':>19}{'vs contiguous':>15}{'max/mean (worst layer)':>24}"
              f"{'placement ms':>14}")
        baseline = None
        for name in POLICIES:
            t = time.perf_counter()
            table = place_experts(name, fit, shape)
            place_ms = (time.perf_counter() - t) * 1000
            crossed = cross_rank_tokens(table, held_out)
            imbalance = [1 / b for b in balancedness(table, measured.loads)]
            baseline = baseline if baseline is not None else sum(crossed)
            row = {"policy": name, "ranks": args.ranks, "slots_per_rank": shape.slots_per_rank, "redundant": extra,
                   "cross_rank_per_layer": crossed, "cross_rank_total": sum(crossed),
                   "cross_rank_vs_contiguous": sum(crossed) / baseline, "max_over_mean_per_layer": imbalance,
                   "placement_ms": place_ms}
            rows.append(row)
            print(f"{name:>12}{sum(crossed):>19}{sum(crossed) / baseline:>15.2f}{max(imbalance):>24.3f}"
                  f"{place_ms:>14.0f}")
    write_results({"environment": environment(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(args).items()},
                   "tokens": len(tokens), "num_experts": num_experts, "rows": rows}, "experts", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
