"""vLLM's offline `LLM.generate` on the engine benchmark's workload; prints JSON.

Run with the interpreter of `.venv-peers` (vLLM's CPU build; `make peers`):

    .venv-peers/bin/python bench/peers/vllm_offline.py --model DIR \
        --num-prompts 64 --prompt-len 256 --output-len 128

Prompts are random token ids rebuilt from `--seed` (bench/workload.py, so they are
the very prompts bench/engine.py gives the other systems) or read from
`--prompts-file` (a JSON list of token-id lists). The result is one JSON object on
one stdout line of its own (the only line that starts with `{`; vLLM logs plenty
around it, on both streams, shutdown messages included); `--out FILE` writes it to
a file as well, which is how bench/engine.py reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for workload

from workload import workload_prompts  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="a Hugging Face model directory")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-file", type=Path, help="JSON list of token-id lists; "
                   "overrides --num-prompts/--prompt-len/--seed")
    p.add_argument("--kv-cache-space", type=int, default=4,
                   help="whole GiB for vLLM's CPU KV cache (VLLM_CPU_KVCACHE_SPACE); "
                   "an already-set environment variable wins")
    p.add_argument("--reserved-cpus", type=int, default=None,
                   help="cores vLLM keeps for its scheduler process "
                   "(VLLM_CPU_NUM_OF_RESERVED_CPU); vLLM's default on x86 is 1, which "
                   "leaves the model one core of two; an already-set environment "
                   "variable wins")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--warmup-prompts", type=int, default=4,
                   help="prompts in the untimed warm-up run (0: none)")
    p.add_argument("--return-token-ids", action="store_true",
                   help="include every output's token ids in the JSON")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    for name in ("num_prompts", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kv_cache_space < 1:
        p.error(f"--kv-cache-space must be >= 1 GiB, got {args.kv_cache_space}")
    if args.reserved_cpus is not None and args.reserved_cpus < 0:
        p.error(f"--reserved-cpus must be >= 0, got {args.reserved_cpus}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prompts_file:
        prompts = json.loads(args.prompts_file.read_text())
        if not prompts or not all(isinstance(p, list) and p for p in prompts):
            raise SystemExit(f"{args.prompts_file} must hold a non-empty list of "
                             "non-empty token-id lists")
    else:
        prompts = workload_prompts(args.model, args.num_prompts, args.prompt_len, args.seed)

    # vLLM reads its environment at import time.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_space))
    if args.reserved_cpus is not None:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(args.reserved_cpus))
    import vllm
    from vllm import LLM, SamplingParams

    max_len = max(len(p) for p in prompts) + args.output_len
    engine_kwargs = dict(
        model=str(args.model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_len,
        # We hand over token ids and want token ids back: no tokenizer needed.
        skip_tokenizer_init=True,
        seed=0,
    )
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs)
    load_s = time.perf_counter() - t0

    def sampling(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                              detokenize=False)

    def run(batch: list[list[int]], max_tokens: int) -> tuple[float, list]:
        inputs = [{"prompt_token_ids": p} for p in batch]
        start = time.perf_counter()
        outs = llm.generate(inputs, sampling(max_tokens), use_tqdm=False)
        return time.perf_counter() - start, outs

    warmup_s = 0.0
    if args.warmup_prompts > 0:
        warmup_s, _ = run(prompts[: args.warmup_prompts], min(16, args.output_len))

    wall_s, outs = run(prompts, args.output_len)
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    out_tokens = sum(len(t) for t in token_ids)
    in_tokens = sum(len(p) for p in prompts)
    short = [i for i, t in enumerate(token_ids) if len(t) != args.output_len]
    result = {
        "system": "vllm",
        "vllm_version": getattr(vllm, "__version__", "unknown"),
        "model": str(args.model),
        "num_prompts": len(prompts),
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": out_tokens / wall_s,
        "total_tokens_per_s": (in_tokens + out_tokens) / wall_s,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "kv_cache_space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
        "reserved_cpus": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "vllm default"),
        "requests_short_of_output_len": short,
    }
    if args.return_token_ids:
        result["token_ids"] = token_ids
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    sys.exit(main())
