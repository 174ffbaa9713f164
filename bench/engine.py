"""Engine throughput: yard's offline engine against transformers and vLLM.

One offline workload, the same for every system: N prompts of random token ids
(seeded), M greedy output tokens each with EOS ignored, all submitted at once. Each
system loads the model, runs an untimed warm-up, then generates the whole set; we
time that call. Systems run one after another in this one invocation, because these
machines are shared and noisy: compare the ratios, not figures across runs.

    python bench/engine.py                      # tiny-llama and llama-100m, all peers
    python bench/engine.py --models tiny-llama --peers ours,hf
    python bench/engine.py --models /path/to/hf/model/dir --num-prompts 16

Peers: `hf` is transformers' batched `generate` in this process; `vllm` is vLLM's
CPU build in `.venv-peers` (`make peers`), run as a subprocess and skipped with a
message when that venv is missing. Prints a table; writes JSON to
bench/results/engine-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # workers/ even where the package is not installed

from environment import environment  # noqa: E402
from workload import workload_prompts  # noqa: E402

SYSTEMS = ("ours", "hf", "vllm")
DEFAULT_MODELS = ("tiny-llama", "llama-100m")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated built-in model names (workers.models.tiny) "
                   "or Hugging Face model directories")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--peers", default=",".join(SYSTEMS),
                   help=f"comma-separated systems to run, from {','.join(SYSTEMS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--warmup-prompts", type=int, default=4,
                   help="prompts in each system's untimed warm-up (16 tokens each)")
    p.add_argument("--hf-batch-size", type=int, default=None,
                   help="transformers' batch size (default: all prompts at once)")
    p.add_argument("--vllm-kv-gib", type=int, default=4,
                   help="vLLM's KV cache, whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--vllm-reserved-cpus", type=int, default=0,
                   help="cores vLLM keeps for its scheduler process rather than the "
                   "model (VLLM_CPU_NUM_OF_RESERVED_CPU). vLLM's own default, 1, "
                   "leaves its model one core of two, while ours and transformers "
                   "use all; 0 (the default here) gives vLLM all cores too, which "
                   "measured faster here. -1: vLLM's default")
    p.add_argument("--vllm-timeout", type=float, default=1800.0, help="seconds")
    p.add_argument("--peers-python", type=Path, default=REPO / ".venv-peers/bin/python",
                   help="interpreter that has vLLM's CPU build")
    p.add_argument("--ours-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for workers.LLM (VALUE parsed as JSON if it "
                   "can be, e.g. max_num_seqs=64); repeatable")
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    args = p.parse_args(argv)

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.peers if s not in SYSTEMS]
    if unknown or not args.peers:
        p.error(f"--peers takes some of {','.join(SYSTEMS)}; got {unknown or 'nothing'}")
    if not args.models:
        p.error("--models is empty")
    for name in ("num_prompts", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.vllm_kv_gib < 1:
        p.error(f"--vllm-kv-gib must be >= 1, got {args.vllm_kv_gib}")
    if args.hf_batch_size is not None and args.hf_batch_size < 1:
        p.error(f"--hf-batch-size must be >= 1, got {args.hf_batch_size}")
    args.ours_kwargs = {}
    for item in args.ours_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--ours-arg takes KEY=VALUE, got {item!r}")
        try:
            args.ours_kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            args.ours_kwargs[key] = value
    return args


def resolve(model: str) -> Path:
    """A built-in preset (made once, cached) or a Hugging Face model directory."""
    try:
        from workers.models.tiny import resolve_model
    except ImportError:
        path = Path(model).expanduser()
        if path.is_dir():
            return path.resolve()
        raise
    return Path(resolve_model(model)).expanduser().resolve()


def agreement(ref: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """How far two systems' greedy outputs agree: identical requests, shared prefix."""
    same = sum(a == b for a, b in zip(ref, other))
    prefix = []
    for a, b in zip(ref, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    return {"identical_requests": same / max(len(ref), 1),
            "mean_common_prefix": sum(prefix) / max(len(prefix), 1)}


def run_system(system: str, model_dir: Path, prompts: list[list[int]],
               args: argparse.Namespace, log_stem: str) -> dict[str, Any]:
    if system == "ours":
        from ours import run_ours
        return run_ours(model_dir, prompts, args.output_len, args.warmup_prompts,
                        args.ours_kwargs)
    if system == "hf":
        from peers.hf_generate import run_hf
        return run_hf(model_dir, prompts, args.output_len,
                      args.hf_batch_size or len(prompts), args.warmup_prompts)
    if system == "vllm":
        from peers.vllm_runner import run_vllm
        return run_vllm(args.peers_python, model_dir, prompts, args.output_len,
                        args.vllm_kv_gib,
                        None if args.vllm_reserved_cpus < 0 else args.vllm_reserved_cpus,
                        args.warmup_prompts,
                        args.results_dir / f"{log_stem}-vllm.log", args.vllm_timeout)
    raise ValueError(f"unknown system {system!r}")


def skip_reason(e: BaseException) -> Optional[str]:
    """A reason to skip (the system is not there) rather than fail, or None."""
    from peers.vllm_runner import PeerUnavailable
    if isinstance(e, PeerUnavailable):
        return str(e)
    return None


def bench_model(model: str, args: argparse.Namespace, stamp: str,
                say: Callable[[str], None]) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": model, "systems": {}}
    try:
        model_dir = resolve(model)
    except Exception as e:
        entry["error"] = f"cannot resolve model {model!r}: {type(e).__name__}: {e}"
        say(entry["error"])
        return entry
    entry["model_dir"] = str(model_dir)
    prompts = workload_prompts(model_dir, args.num_prompts, args.prompt_len, args.seed)
    stem = f"engine-{stamp}-{Path(model).name}"
    for system in args.peers:
        say(f"[{model}] {system}: running ...")
        try:
            r = run_system(system, model_dir, prompts, args, stem)
        except Exception as e:
            reason = skip_reason(e)
            if reason:
                say(f"[{model}] {system}: skipped: {reason}")
                entry["systems"][system] = {"skipped": reason}
            else:
                traceback.print_exc()
                say(f"[{model}] {system}: FAILED: {type(e).__name__}: {e}")
                entry["systems"][system] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out_tokens = sum(len(t) for t in r["token_ids"])
        short = sum(len(t) != args.output_len for t in r["token_ids"])
        r.update(output_tokens=out_tokens, requests_short_of_output_len=short,
                 output_tokens_per_s=out_tokens / r["wall_s"])
        say(f"[{model}] {system}: {r['output_tokens_per_s']:.0f} output tokens/s, "
            f"{r['wall_s']:.2f} s (load {r['load_s']:.1f} s, warm-up {r['warmup_s']:.1f} s)"
            + (f"; {short} requests NOT at {args.output_len} tokens" if short else ""))
        entry["systems"][system] = r
    done = {s: r for s, r in entry["systems"].items() if "token_ids" in r}
    ref = "hf" if "hf" in done else next(iter(done), None)
    for s, r in done.items():
        if s != ref:
            r["agreement_with_" + ref] = agreement(done[ref]["token_ids"], r["token_ids"])
    return entry


def table(entries: list[dict[str, Any]]) -> str:
    peers = [s for s in ("hf", "vllm")
             if any("output_tokens_per_s" in e["systems"].get(s, {}) for e in entries)]
    head = ["model", "system", "out tok/s", "wall s"] + [f"ours/{p}" for p in peers] \
        + ["same as ref"]
    rows = [head]
    for e in entries:
        if "error" in e:
            rows.append([e["model"], "-", "FAILED", "-"] + ["-"] * len(peers) + ["-"])
            continue
        systems = e["systems"]
        ours = systems.get("ours", {}).get("output_tokens_per_s")
        for s in SYSTEMS:
            r = systems.get(s)
            if r is None:
                continue
            if "output_tokens_per_s" not in r:
                rows.append([e["model"], s, "skipped" if "skipped" in r else "FAILED", "-"]
                            + ["-"] * len(peers) + ["-"])
                continue
            ratios = []
            for p in peers:
                theirs = systems.get(p, {}).get("output_tokens_per_s")
                ratios.append(f"{ours / theirs:.2f}x" if s == "ours" and ours and theirs
                              else "")
            agree = next((v for k, v in r.items() if k.startswith("agreement_with_")), None)
            rows.append([e["model"], s, f"{r['output_tokens_per_s']:.0f}",
                         f"{r['wall_s']:.2f}"] + ratios
                        + [f"{agree['identical_requests']:.0%}" if agree else "ref"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for e in entries:
        over = e["systems"].get("ours", {}).get("extra", {}).get("overhead")
        if over:
            steps = e["systems"]["ours"]["extra"].get("steps")
            cores = e["systems"]["ours"]["extra"].get("cpu_cores")
            notes.append(f"{e['model']}: ours spends {over['share']:.1%} of step time "
                         f"outside the model forward ({over['source']})"
                         + (f"; {steps} steps in the timed run" if steps else "")
                         + (f"; {cores:.2f} cores busy" if cores else ""))
        elif "output_tokens_per_s" in e["systems"].get("ours", {}):
            notes.append(f"{e['model']}: engine.stats() gave no forward/step split")
    return "\n".join(lines + [""] + notes)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    say(f"workload: {args.num_prompts} prompts x {args.prompt_len} random tokens "
        f"(seed {args.seed}), {args.output_len} greedy output tokens each, EOS ignored")
    entries = [bench_model(m, args, stamp, say) for m in args.models]

    print()
    print(f"engine benchmark: {args.num_prompts} prompts, {args.prompt_len} in / "
          f"{args.output_len} out, greedy; ratios > 1 mean ours is faster")
    print(table(entries))

    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"engine-{stamp}.json"
    for e in entries:  # keep the JSON readable: token ids only as a count
        for r in e["systems"].values():
            r.pop("token_ids", None)
    out.write_text(json.dumps({
        "benchmark": "engine",
        "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "seed": args.seed,
                     "greedy": True, "ignore_eos": True,
                     "warmup_prompts": args.warmup_prompts},
        "environment": environment("torch", "transformers"),
        "results": entries,
    }, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    failed = [(e["model"], s) for e in entries for s, r in e["systems"].items()
              if "error" in r] + [(e["model"], "-") for e in entries if "error" in e]
    return 1 if failed else 0


if __name__ == "__main__":  # vLLM's spawn re-imports __main__ in its subprocess only
    sys.exit(main())
