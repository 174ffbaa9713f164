"""Attention offloading: traffic against the theory, and the decode step with
ping-pong micro-batches against one batch and against no offloading.

For each context length, a batch of sequences is prefilled, then decode steps are
timed. The model worker (this process) is pinned to core 0 and the attention worker
to core 1, one torch thread each, so that the two sides do not share compute; the
plain engine runs on core 0 alone. Layouts, one run:
  - no offload, one core;
  - offload, K=1, m=1: the step is the dense time plus the attention-and-transfer
    time (the model worker waits for every layer's output);
  - offload, K=1, m=2: the two overlap. Target (issue 13): at most 1.2 x max(dense,
    attention + transfer), both measured at m=1.
Traffic per token and layer, counted by the link, against (2 * hidden + 2 * kv_heads *
head_dim) * dtype bytes. Capacity at equal memory: bench/offload_capacity.py.

    python bench/offload.py                         # llama-100m (8,192 positions), contexts 1024, 4096
    python bench/offload.py --contexts 1024,4096,8000 --batch 4 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
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
from long_context_model import long_context_model  # noqa: E402
from pinning import pin, pin_actor  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a preset or model directory (default: llama-100m with 8,192 "
                                                      "positions, bench/long_context_model.py)")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def run(args: argparse.Namespace, context: int, offload: Any) -> dict[str, Any]:
    import torch

    from workers import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine

    blocks = args.batch * (context + args.decode_steps + 16) // 16 + 8
    from workers.models.config import load_model_config
    from workers.models.tiny import resolve_model

    longest = load_model_config(resolve_model(args.model)).max_position_embeddings - args.decode_steps - 2
    if context > longest:
        raise SystemExit(f"context {context} + {args.decode_steps} decode steps does not fit {args.model}'s "
                         f"positions: at most {longest}")
    engine = LLMEngine(EngineConfig(model=args.model, dtype="float32", num_kv_blocks=blocks,
                                    max_num_batched_tokens=4096, attention_offload=offload))
    cores = os.sched_getaffinity(0)
    try:
        rng = random.Random(context)
        params = SamplingParams(temperature=0, max_tokens=args.decode_steps + 1, ignore_eos=True)
        for i in range(args.batch):
            engine.add_request(str(i), [rng.randrange(4, engine.model_config.vocab_size) for _ in range(context)], params)
        while engine.scheduler.waiting or any(r.seq.num_uncomputed_tokens > 1 for r in engine.requests.values()):
            engine.step()  # prefill on every core, unpinned
        pin(os.getpid(), 0)
        torch.set_num_threads(1)
        if engine.offload is not None:
            for worker in engine.offload.workers:
                pin_actor(worker, 1)
        link = engine.runner.offload
        before = dataclasses.replace(link.traffic) if link else None
        steps = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        row = {"context": context, "batch": args.batch, "median_step_ms": statistics.median(steps) * 1000,
               "tokens_per_s": args.batch * len(steps) / sum(steps)}
        if link:
            t = link.traffic
            row["wait_ms_per_step"] = (t.exchange_s - before.exchange_s) / len(steps) * 1000
            # The share of attention and transfer the model worker did not wait for.
            row["hidden"] = 1 - (t.blocked_s - before.blocked_s) / (t.exchange_s - before.exchange_s)
            tokens = t.tokens - before.tokens
            row["bytes_out_per_token_layer"] = (t.bytes_out - before.bytes_out) / tokens
            row["bytes_in_per_token_layer"] = (t.bytes_in - before.bytes_in) / tokens
        return row
    finally:
        engine.shutdown()
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))


def main() -> int:
    import ray

    from workers.models.config import load_model_config
    from workers.models.tiny import resolve_model

    args = parse_args()
    args.model = args.model or str(long_context_model())
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    cfg = load_model_config(resolve_model(args.model))
    # q is num_heads * head_dim wide (the "hidden" where head_dim * heads == hidden)
    theory_out = (cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim) * 4
    theory_in = cfg.num_heads * cfg.head_dim * 4
    rows = []
    print(f"{args.model}: batch {args.batch}, {args.decode_steps} decode steps; model worker on core 0, attention "
          f"worker on core 1, one torch thread each; no offload on core 0 alone")
    print(f"{'context':>8}{'layout':>18}{'step ms':>9}{'tokens/s':>10}{'wait ms':>9}{'dense ms':>10}"
          f"{'bytes/token/layer out, in (theory)':>38}")
    try:
        for context in (int(c) for c in args.contexts.split(",")):
            plain = run(args, context, None)
            m1 = run(args, context, {"workers": 1, "micro_batches": 1, "cpus_per_worker": 1})
            m2 = run(args, context, {"workers": 1, "micro_batches": 2, "cpus_per_worker": 1})
            dense, attention = m1["median_step_ms"] - m1["wait_ms_per_step"], m1["wait_ms_per_step"]
            m2["target_ms"] = 1.2 * max(dense, attention)
            for name, row in (("no offload", plain), ("offload m=1", m1), ("offload m=2", m2)):
                row["layout"] = name
                wait = f"{row['wait_ms_per_step']:.2f}" if "wait_ms_per_step" in row else "-"
                dense_ms = f"{dense:.2f}" if row is m1 else "-"
                traffic = (f"{row['bytes_out_per_token_layer']:.0f}, {row['bytes_in_per_token_layer']:.0f} "
                           f"({theory_out}, {theory_in})") if "bytes_out_per_token_layer" in row else "-"
                print(f"{context:>8}{name:>18}{row['median_step_ms']:>9.2f}{row['tokens_per_s']:>10.0f}{wait:>9}"
                      f"{dense_ms:>10}{traffic:>38}")
                rows.append(row)
            print(f"{'':>8}m=2 step {m2['median_step_ms']:.2f} ms against the target 1.2 x max(dense {dense:.2f}, "
                  f"attention + transfer {attention:.2f}) = {m2['target_ms']:.2f} ms; m=2 / no offload "
                  f"{m2['median_step_ms'] / plain['median_step_ms']:.2f}; attention + transfer hidden behind "
                  f"dense compute: m=1 {m1['hidden']:.0%}, m=2 {m2['hidden']:.0%}")
    finally:
        ray.shutdown()
    write_results({"environment": environment(), "model": args.model, "theory_bytes_out": theory_out,
                   "theory_bytes_in": theory_in, "rows": rows}, "offload", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
