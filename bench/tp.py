"""Tensor parallelism: decode step latency, tokens/s and all-reduce traffic for TP=1, 2, 4.

One offline workload per TP size, in one invocation (compare the ratios: the machine
is shared and noisy). On a 2-core CPU no speed-up is expected: the ranks share the
same two cores and every layer waits on two all-reduces over loopback; the figures
show what tensor parallelism costs here, not what it buys on GPUs.

Traffic is counted on rank 0 during the decode phase only and divided by the tokens
generated there, next to the theoretical figure: 2 all-reduces of hidden_size values
per layer per token (after o_proj and after down_proj), times the dtype size. The
vocab-parallel embedding adds one more all-reduce per token, shown separately.

    python bench/tp.py                          # tiny-llama, TP 1,2,4
    python bench/tp.py --models tiny-llama,tiny-moe --tp 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny-llama")
    p.add_argument("--tp", default="1,2,4")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    return p.parse_args()


def run(model: str, tp: int, args: argparse.Namespace) -> dict[str, Any]:
    from workers import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, dtype="float32", tensor_parallel_size=tp,
                                    tp_cpus_per_rank=0.5))
    try:
        rng = random.Random(0)
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        for i in range(args.num_prompts):
            engine.add_request(str(i), [rng.randrange(4, 1000) for _ in range(args.prompt_len)], params)
        start = time.perf_counter()
        generated = 0
        while engine.scheduler.waiting or any(r.seq.num_uncomputed_tokens > 1 for r in engine.requests.values()):
            generated += sum(len(o.new_token_ids) for o in engine.step())
        prefill_s = time.perf_counter() - start
        traffic = engine.runner.tp.traffic
        calls0, bytes0, steps0, decode_start = traffic.all_reduce_calls, traffic.all_reduce_bytes, \
            engine.stats().num_steps, time.perf_counter()
        decoded = 0
        while engine.has_unfinished_requests():
            decoded += sum(len(o.new_token_ids) for o in engine.step())
        decode_s = time.perf_counter() - decode_start
        steps = engine.stats().num_steps - steps0
        cfg = engine.model_config
        itemsize = 4
        return {
            "model": model, "tp": tp,
            "output_tokens_per_s": (generated + decoded) / (prefill_s + decode_s),
            "decode_step_ms": decode_s / steps * 1e3,
            "all_reduce_bytes_per_token": (traffic.all_reduce_bytes - bytes0) / decoded if tp > 1 else 0.0,
            "all_reduces_per_step": (traffic.all_reduce_calls - calls0) / steps if tp > 1 else 0.0,
            "theory_bytes_per_token": 2 * cfg.num_layers * cfg.hidden_size * itemsize if tp > 1 else 0,
            "embedding_bytes_per_token": cfg.hidden_size * itemsize if tp > 1 else 0,
        }
    finally:
        engine.shutdown()


def main() -> int:
    args = parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = [run(m, tp, args) for m in args.models.split(",") for tp in map(int, args.tp.split(","))]
    base = {r["model"]: r for r in rows if r["tp"] == 1}
    print(f"tensor parallelism: {args.num_prompts} prompts, {args.prompt_len} in / {args.output_len} out, "
          f"float32, {os.cpu_count()} cores")
    head = f"{'model':<12}{'TP':>3}{'tok/s':>9}{'vs TP=1':>9}{'step ms':>9}{'AR/step':>8}{'bytes/tok':>11}" \
           f"{'theory':>9}{'+embed':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["output_tokens_per_s"] / base[r["model"]]["output_tokens_per_s"] if r["model"] in base else 0
        print(f"{r['model']:<12}{r['tp']:>3}{r['output_tokens_per_s']:>9.0f}{ratio:>8.2f}x"
              f"{r['decode_step_ms']:>9.1f}{r['all_reduces_per_step']:>8.1f}"
              f"{r['all_reduce_bytes_per_token']:>11.0f}{r['theory_bytes_per_token']:>9}"
              f"{r['embedding_bytes_per_token']:>8}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"tp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"benchmark": "tp", "rows": rows}, indent=2))
    print(f"\nwrote {out.relative_to(REPO)}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
