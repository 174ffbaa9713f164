"""The `yard` command line: argument parsing only; each subcommand calls into the library.

Heavy imports (torch, the engine) happen inside the subcommand that needs them, so
`yard --help` stays instant.

To add a subcommand: write `_add_<name>(subparsers)` that registers its parser with
`set_defaults(func=...)`, and call it from `build_parser`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from workers.engine.interface import BACKENDS

MODEL_KINDS = ("tiny-llama", "tiny-moe", "tiny-moe-affinity", "tiny-qwen2", "llama-100m")  # workers.models.tiny.PRESETS
DTYPES = ("float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="make or locate model checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")

    make = model_sub.add_parser("make", help="write a seeded random model in Hugging Face format")
    make.add_argument("kind", choices=MODEL_KINDS)
    make.add_argument("--out", required=True, help="directory to write into (created if needed)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", choices=DTYPES, default="float32")
    make.add_argument("--shards", type=_positive_int, default=1, help="number of safetensors shard files")
    make.set_defaults(func=_model_make)

    path = model_sub.add_parser("path", help="print a model's directory, making a preset in the cache if absent")
    path.add_argument("model", help="preset name or model directory")
    path.set_defaults(func=_model_path)


def _model_make(args: argparse.Namespace) -> int:
    from workers.models.tiny import make_tiny_model

    out = make_tiny_model(args.kind, args.out, seed=args.seed, dtype=args.dtype, shards=args.shards)
    print(out)
    return 0


def _model_path(args: argparse.Namespace) -> int:
    from workers.models.tiny import resolve_model

    print(resolve_model(args.model))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text offline with the in-process engine")
    gen.add_argument("--model", required=True, help="preset name or model directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=_positive_int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--dtype", choices=DTYPES, default=None, help="default: the engine's choice")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from workers import LLM, SamplingParams
    from workers.models.tiny import resolve_model

    model_kwargs = {} if args.dtype is None else {"dtype": args.dtype}
    llm = LLM(model=str(resolve_model(args.model)), **model_kwargs)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        outputs = llm.generate([args.prompt], params)
    print(outputs[0].text)
    return 0


def _add_serving(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start (or join) a Ray cluster and serve a model over HTTP and gRPC")
    demo = sub.add_parser("demo", help="serve the tiny model, send one request through each API, stop")
    for p in (serve, demo):
        p.add_argument("--config", help="serve config YAML (docs/config.md)")
        p.add_argument("--model", help="preset name or model directory (overrides the config)")
        p.add_argument("--workers", type=_positive_int, help="number of workers (overrides the config)")
        p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
        p.add_argument("--http-port", type=_positive_int, help="default 8000")
        p.add_argument("--grpc-port", type=_positive_int, help="default 9000")
        p.add_argument("--ingress", choices=("proxy", "direct"),
                       help="proxy: Serve's proxies take the traffic (default); direct: the router replica "
                       "listens itself, one hop fewer (docs/config.md)")
        p.add_argument("--backend", choices=BACKENDS,
                       help="the engine inside each worker: yard (default) or vllm (docs/vllm-backend.md)")
    serve.set_defaults(func=_serve)
    demo.set_defaults(func=_demo)
    status = sub.add_parser("status", help="workers of a running cluster: role, health, load")
    status.add_argument("--cluster", default="yard", help="cluster name (default yard)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_status)
    stop = sub.add_parser("stop", help="stop a running cluster's manager and workers (before a redeploy "
                          "that changes its settings)")
    stop.add_argument("--cluster", default="yard", help="cluster name (default yard)")
    stop.set_defaults(func=_stop)
    drain = sub.add_parser("drain", help="move every request off a worker (live migration); returns when it is empty")
    drain.add_argument("worker_id", nargs="?", help="the worker's id, as yard status shows it")
    drain.add_argument("--this-node", action="store_true",
                       help="every worker on this Ray node instead (a pod's preStop hook)")
    drain.add_argument("--cluster", default=None, help="cluster name (default: from --values, else yard)")
    drain.add_argument("--values", type=Path, default=None,
                       help="a values file (deploy/): its cluster.name names the cluster")
    drain.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (default 300)")
    drain.set_defaults(func=_drain)
    experts = sub.add_parser("experts", help="a MoE worker's routing over the last minute: expert loads, "
                             "layer-to-layer affinity (docs/experts.md)")
    experts.add_argument("worker_id", help="the worker's id, as yard status shows it")
    experts.add_argument("--json", action="store_true", help="print the statistics as JSON")
    experts.add_argument("--replace", action="store_true", help="re-place the experts live from these statistics "
                         "(expert parallelism)")
    experts.add_argument("--policy", choices=("contiguous", "balanced", "affinity", "combined"),
                         help="with --replace: the placement policy (default: the worker's "
                         "expert_replacement_policy)")
    experts.set_defaults(func=_experts)


def _serve_config(args: argparse.Namespace) -> dict:
    from cluster.serving import load_serve_config

    return load_serve_config(args.config, args.model, args.workers, args.http_port, args.grpc_port, args.host,
                             args.ingress, args.backend)


def _serve(args: argparse.Namespace) -> int:
    from cluster.serving import serve_forever

    serve_forever(_serve_config(args))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cluster.serving import demo

    demo(_serve_config(args))
    return 0


def _status(args: argparse.Namespace) -> int:
    from cluster.serving import print_status

    return print_status(args.cluster, args.json)


def _stop(args: argparse.Namespace) -> int:
    from cluster.serving import stop_command

    return stop_command(args.cluster)


def _drain(args: argparse.Namespace) -> int:
    from cluster.serving import drain

    if (args.worker_id is None) == (not args.this_node):
        raise ValueError("name one worker id, or --this-node (not both)")
    cluster = args.cluster
    if cluster is None and args.values is not None:
        from cluster.values import with_values_file

        cluster = (with_values_file({"values_file": args.values}).get("cluster") or {}).get("name")
    return drain(cluster or "yard", args.worker_id, args.timeout)


def _experts(args: argparse.Namespace) -> int:
    from cluster.experts_command import print_experts

    return print_experts(args.worker_id, args.json, args.replace, args.policy)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_simulation(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="run a trace through a simulated cluster: yard's own policies on "
                         "simulated time (docs/simulate.md)")
    sim.add_argument("--trace", type=Path, required=True, help=".csv (arrived_at, num_prefill_tokens, "
                     "num_decode_tokens) or .jsonl (Mooncake)")
    sim.add_argument("--config", type=Path, help="serve config YAML (the cluster and router sections)")
    sim.add_argument("--step-time", type=Path, required=True, help="a step-time model, written by yard profile")
    sim.add_argument("--time-scale", type=_positive_float, default=1.0, help="arrivals this many times faster")
    sim.add_argument("--length-divisor", type=_positive_int, default=1, help="divide prompt and output lengths")
    sim.add_argument("--max-prompt-tokens", type=_positive_int)
    sim.add_argument("--max-output-tokens", type=_positive_int)
    sim.add_argument("--limit", type=_positive_int, help="only the trace's first N requests")
    sim.add_argument("--slo-ttft", type=_positive_float, help="goodput: TTFT at most this many seconds")
    sim.add_argument("--slo-tpot", type=_positive_float, help="goodput: TPOT at most this many seconds")
    sim.add_argument("--relay-s", type=float, default=0.0, help="router-worker delay, each way (default 0)")
    sim.add_argument("--worker-startup-s", type=float, default=30.0, help="a worker added by scaling serves "
                     "after this long (default 30)")
    sim.add_argument("--max-simulated-s", type=_positive_float, default=7 * 24 * 3600.0,
                     help="stop there, counting what is left as unfinished (default a week)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", type=Path, help="write summary.json, requests.csv, migrations.csv, workers.csv here")
    sim.add_argument("--plot", action="store_true", help="also latency_cdf.png and load_per_worker.png (with --out)")
    sim.add_argument("--sweep", action="store_true", help="search for the fewest workers (colocated, or split "
                     "into prefill and decode pools) that meet --slo-ttft and --slo-tpot")
    sim.add_argument("--attainment", type=_positive_float, default=0.9,
                     help="--sweep: the fraction of requests that must meet both SLOs (default 0.9)")
    sim.add_argument("--max-workers", type=_positive_int, default=16, help="--sweep: the largest size tried")
    sim.add_argument("--no-split", action="store_true", help="--sweep: colocated layouts only")
    sim.set_defaults(func=_simulate)
    prof = sub.add_parser("profile", help="measure the engine's step time on this machine and fit the "
                          "simulator's step-time model")
    prof.add_argument("--model", required=True, help="preset name or model directory")
    prof.add_argument("--out", type=Path, required=True, help="the step-time model file to write (JSON)")
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--dtype", choices=DTYPES, default=None)
    prof.add_argument("--block-size", type=_positive_int, default=16)
    prof.add_argument("--repeats", type=_positive_int, default=3, help="each batch shape this often (median)")
    prof.add_argument("--transfer-bytes-per-s", type=_positive_float,
                      help="a cluster's KV transfer rate (default: measured in this process)")
    prof.add_argument("--transfer-latency-s", type=float, default=0.001, help="fixed cost of one KV copy")
    prof.set_defaults(func=_profile)


def _simulate(args: argparse.Namespace) -> int:
    from cluster.sim.cluster import SimOptions
    from cluster.sim.command import simulate
    from cluster.sim.trace import TraceScale

    if args.plot and args.out is None:
        raise ValueError("--plot writes its pictures under --out: give --out DIR")
    scale = TraceScale(args.time_scale, args.length_divisor, args.max_prompt_tokens, args.max_output_tokens,
                       args.limit)
    options = SimOptions(args.seed, args.relay_s, args.worker_startup_s, max_simulated_s=args.max_simulated_s)
    if args.sweep:
        from cluster.sim.command import sweep

        if args.slo_ttft is None or args.slo_tpot is None:
            raise ValueError("--sweep needs both --slo-ttft and --slo-tpot")
        answer = sweep(args.trace, args.config, args.step_time, scale, options, args.out, args.slo_ttft,
                       args.slo_tpot, args.attainment, args.max_workers, not args.no_split)
        return 0 if answer is not None else 1
    simulate(args.trace, args.config, args.step_time, scale, options, args.out, args.slo_ttft, args.slo_tpot,
             args.plot)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from cluster.sim.command import profile

    profile(args.model, args.out, args.device, args.dtype, args.block_size, args.repeats,
            args.transfer_bytes_per_s, args.transfer_latency_s)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yard", description="yard: a serving cluster for large language models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model(sub)
    _add_generate(sub)
    _add_serving(sub)
    _add_simulation(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, not a traceback
        print(f"yard: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
