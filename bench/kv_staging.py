"""Staging handed-over KV in a vLLM worker of several tensor-parallel ranks: every rank
sent all the ranks' shares (one `collective_rpc` argument, as vLLM broadcasts it)
against each rank mapping its own share from shared memory (workers/vllm/rank_shares.py).

Both ways run in the same engine, alternating, on synthetic payloads (bfloat16, four
layers per rank). Each timing is the staging call plus one read of every page of the
staged share in every rank (what writing it into the request's blocks reads), so the
mapped share's page faults are counted. vLLM binds each rank to its own share of the
CPUs (workers/vllm/cpu_binding.py); on this project's 2-core machines that is one core
a rank, with the driver sharing them.

    python bench/kv_staging.py                      # 2 ranks, 16/64/256 MiB per rank
    python bench/kv_staging.py --ranks 2 --mib 64 --repeat 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--mib", default="16,64,256", help="payload per rank, MiB, comma-separated")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    args.mib = [int(m) for m in args.mib.split(",") if m.strip()]
    if args.ranks < 2:
        p.error(f"--ranks must be >= 2 (one rank takes its share in process), got {args.ranks}")
    return args


def rank_read_all(_worker: Any, key: str) -> float:
    """In a rank: read every page of its staged share once."""
    from workers.vllm import kv_handover

    with kv_handover._SHARED.lock:
        parts = kv_handover._SHARED.shards[key]
    return sum(float(t.view(-1)[::512].float().sum()) for _, blocks in parts for t in blocks.values())


def payload(ranks: int, mib: int) -> list[list[tuple[int, dict]]]:
    import torch

    n = mib * 2**20 // 2 // 4  # bfloat16 values per layer, four layers
    return [[(0, {f"layer{i}": torch.full((n,), float(r + i), dtype=torch.bfloat16) for i in range(4)})]
            for r in range(ranks)]


def measure(on_ranks: Any, shares: list, repeat: int) -> dict[str, float]:
    from workers.vllm import kv_handover, rank_shares

    broadcast, own = [], []
    for k in range(-1, repeat):  # k = -1: a warm-up of both ways, untimed
        t = time.perf_counter()
        on_ranks(kv_handover.rank_stage, f"all-{k}", shares)
        on_ranks(rank_read_all, f"all-{k}")
        broadcast.append(time.perf_counter() - t)
        on_ranks(kv_handover.rank_unstage, f"all-{k}")
        t = time.perf_counter()
        with rank_shares.published(shares) as placed:
            on_ranks(kv_handover.rank_stage, f"own-{k}", placed)
        on_ranks(rank_read_all, f"own-{k}")
        own.append(time.perf_counter() - t)
        on_ranks(kv_handover.rank_unstage, f"own-{k}")
    broadcast, own = broadcast[1:], own[1:]
    return {"all_shares_to_every_rank_ms": [s * 1000 for s in broadcast],
            "own_share_mapped_ms": [s * 1000 for s in own],
            "speedup_median": statistics.median(broadcast) / statistics.median(own)}


def main() -> int:
    args = parse_args()
    from workers.engine.config import EngineConfig
    from workers.vllm.engine import VLLMEngine

    engine = VLLMEngine(EngineConfig(backend="vllm", model=args.model, tensor_parallel_size=args.ranks,
                                     kv_cache_memory_gib=0.5))
    print(f"vLLM engine of {args.ranks} ranks, each bound to its own CPUs; medians of {args.repeat}")
    print(f"{'MiB per rank':>12} | {'all shares to every rank':>24} | {'own share, mapped':>17} | ratio")
    results = []
    try:
        for mib in args.mib:
            r = measure(engine._on_ranks, payload(args.ranks, mib), args.repeat)
            results.append({"mib_per_rank": mib, **r})
            print(f"{mib:>12} | {statistics.median(r['all_shares_to_every_rank_ms']):>21.1f} ms | "
                  f"{statistics.median(r['own_share_mapped_ms']):>14.1f} ms | {r['speedup_median']:.2f}x", flush=True)
    finally:
        engine.shutdown()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"kv-staging-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"ranks": args.ranks, "repeat": args.repeat, "results": results}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
