"""Serving: open-loop load on the OpenAI HTTP API, the router's overhead over calling a
worker directly, and vLLM's server under vLLM's own benchmark client.

Three parts, one invocation (these machines are shared and noisy: compare within a
run, not across runs):

1. Load. The same requests go (a) straight to a `Worker` actor created here, its
   `generate` called over Ray from this process, and (b) through the Serve
   application (HTTP proxy, router replica, cluster manager, one worker with the same
   engine config) as streaming `/v1/completions` with token-id prompts. Arrivals:
   Poisson at --rate, bursty Gamma (CV --cv, 3 by default) at the same mean rate, and
   `saturate` (all at t=0: the throughput ceiling). Per scenario the two paths run
   back to back, in alternating order (or by turns of --interleave requests); TTFT,
   TPOT, end-to-end latency (p50/p99) and output tokens/s for each.
2. Router overhead: per scenario, what (b) adds to (a) at p50 and the throughput
   ratio (b)/(a), against the issue's targets (at most 2 ms added at p50, at most 5%
   throughput lost; the throughput target is judged on `saturate`, where the
   throughput is the system's, not the arrival rate's).
3. Peers, where `.venv-peers` exists (`make peers`): the same model under
   `vllm serve` (and, with --peers vllm,ray-serve-llm, Ray Serve LLM with the same
   vLLM inside) and `vllm bench serve` as the client, with the same flags against
   every server and ours (random dataset at this workload's mean lengths or
   --peer-input-len/--peer-output-len, --random-range-ratio 0.5, ignore_eos, the same
   arrivals); the summaries side by side with ratios, and the CPU seconds each
   server's processes spent in each run, split by process (proxy, router replica,
   worker, vLLM's API server and engine core, the client) per 1,000 output tokens.
   Skipped with a message when the venv is missing.

`--standard` runs only the standard comparison instead (bench/serving_standard.py):
`vllm bench serve`'s random 200 x 256/128 at rate inf and Poisson 2 and 8 req/s
against `vllm serve` and ours with proxy and with direct ingress, `--repeat` runs
(3), every server started afresh in each (docs/performance.md has the figures).

`--backend vllm` runs vLLM's engine inside our workers (docs/vllm-backend.md): then
ours against `vllm serve` is the relay's cost over vLLM's own server.

Workload: lengths from the Azure 2023 conversation trace scaled down (bench/load_client.py
says how; the run prints it), random token-id prompts, greedy, EOS ignored.

    python bench/serving.py                       # everything, a few minutes on 2 cores
    python bench/serving.py --num-requests 32 --rate 2 --scenarios poisson
    python bench/serving.py --no-peers            # skip vLLM
    python bench/serving.py --scenarios poisson --rate 2 --no-peers --num-requests 128 --interleave 8
                                                  # the router's added TTFT at 2 req/s, the paths by turns
    python bench/serving.py --standard            # the standard comparison, 3 runs, ~25 minutes
    python bench/serving.py --backend vllm --paths serve --scenarios saturate \\
        --peers vllm,ray-serve-llm --peer-num-requests 200 --peer-input-len 256 --peer-output-len 128

Prints tables; writes JSON to bench/results/serving-<timestamp>.json (vLLM's logs
next to it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # workers/, cluster/, router/ even where not installed

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray of our own: no token
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import load_client as lc  # noqa: E402
from environment import environment  # noqa: E402
from workload import special_ids, vocab_size  # noqa: E402

from cluster.serving import free_port  # noqa: E402

if TYPE_CHECKING:
    from cpu_time import ProcessCPU

DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "azure2023_conv.csv"
PATHS = ("direct", "serve")
PEER_SERVERS = ("vllm", "ray-serve-llm")
TARGET_ADDED_MS = 2.0
TARGET_THROUGHPUT_LOSS = 0.05


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--model", default="tiny-llama",
                   help="built-in model name (workers.models.tiny) or a Hugging Face model directory")
    p.add_argument("--served-model-name", default="tiny-llama",
                   help="the model name both OpenAI servers answer to")
    p.add_argument("--num-requests", type=int, default=64, help="requests per scenario and path")
    p.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, requests/s")
    p.add_argument("--cv", type=float, default=3.0, help="coefficient of variation of the bursty gaps")
    p.add_argument("--scenarios", default=",".join(lc.ARRIVALS),
                   help=f"comma-separated, from {','.join(lc.ARRIVALS)}")
    p.add_argument("--paths", default=",".join(PATHS), help="direct (worker actor), serve (HTTP), or both")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                   help="CSV with num_prefill_tokens,num_decode_tokens (the Azure 2023 trace); "
                   "missing: synthetic ShareGPT-like lengths")
    p.add_argument("--prompt-scale", type=float, default=1 / 8, help="trace prompt lengths times this")
    p.add_argument("--output-scale", type=float, default=1 / 2, help="trace output lengths times this")
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=4, help="untimed, per path, before the scenarios")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="run the paths by turns, N requests at a time (each block's arrivals as in the "
                   "scenario, the other path's block after it drains), so that a drift of the machine "
                   "falls on both; 0: each path runs the whole scenario in turn")
    p.add_argument("--max-duration-s", type=float, default=60.0,
                   help="per scenario: requests due later are not sent")
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--worker-cpus", type=float, default=2.0,
                   help="Ray CPUs of the worker actor (both paths); its torch threads follow it")
    p.add_argument("--ray-cpus", type=int, default=8,
                   help="logical CPUs of the local Ray instance (oversubscribed on purpose, as in the tests)")
    p.add_argument("--serve-env", choices=("streaming", "default"), default="streaming",
                   help="streaming: the Serve settings yard serve uses (cluster/serve_env.py); "
                   "default: Ray Serve's own defaults")
    p.add_argument("--ingress", choices=("proxy", "direct"), default="proxy",
                   help="how HTTP reaches the router replica: through Serve's proxy, or straight (docs/config.md)")
    p.add_argument("--stream-interval-s", type=float, default=None,
                   help="worker stream interval (WorkerConfig.stream_interval_s; default: its default)")
    p.add_argument("--stream-interval-max-s", type=float, default=None,
                   help="the most the stream interval grows to with many requests streaming "
                        "(WorkerConfig.stream_interval_max_s; default: its default)")
    p.add_argument("--backend", choices=("yard", "vllm"), default="yard",
                   help="the engine inside our workers (EngineConfig.backend)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="an EngineConfig setting for our workers, e.g. max_num_seqs=128 (repeatable; "
                   "the value is read as YAML)")
    p.add_argument("--no-peers", action="store_true", help="skip vllm serve / vllm bench serve")
    p.add_argument("--peers", default="vllm", help=f"servers beside ours, from {','.join(PEER_SERVERS)}")
    p.add_argument("--peer-input-len", type=int, default=None, help="default: the workload's mean prompt length")
    p.add_argument("--peer-output-len", type=int, default=None, help="default: the workload's mean output length")
    p.add_argument("--peer-scenarios", default="poisson,saturate",
                   help="arrivals for vllm bench serve against both servers")
    p.add_argument("--peer-num-requests", type=int, default=None, help="default: --num-requests")
    p.add_argument("--peers-python", type=Path, default=REPO / ".venv-peers/bin/python",
                   help="interpreter that has vLLM's CPU build")
    p.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-reserved-cpus", type=int, default=0,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU (0: the model gets both cores; -1: vLLM's default)")
    p.add_argument("--vllm-startup-timeout-s", type=float, default=300.0)
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    p.add_argument("--standard", action="store_true",
                   help="only the standard comparison (bench/serving_standard.py): vllm bench serve, random "
                   "200 x 256/128 at rate inf, Poisson 2 and 8, against vllm serve and ours with proxy and "
                   "direct ingress")
    p.add_argument("--repeat", type=int, default=3, help="with --standard: runs, each starting every server")
    p.add_argument("--standard-rates", default="inf,2,8", help="with --standard: request rates (inf or req/s)")
    args = p.parse_args(argv)

    args.scenarios = _names(p, "--scenarios", args.scenarios, lc.ARRIVALS)
    args.peer_scenarios = _names(p, "--peer-scenarios", args.peer_scenarios, lc.ARRIVALS)
    args.paths = _names(p, "--paths", args.paths, PATHS)
    args.peers = _names(p, "--peers", args.peers, PEER_SERVERS)
    for name in ("num_requests", "max_prompt_len", "max_output_len", "ray_cpus"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_output_len < 2:
        p.error("--max-output-len must be >= 2 (TPOT needs two output tokens)")
    for name in ("rate", "cv", "prompt_scale", "output_scale", "max_duration_s", "request_timeout_s",
                 "worker_cpus"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup_requests < 0:
        p.error("--warmup-requests must be >= 0")
    if args.interleave < 0:
        p.error(f"--interleave must be >= 0, got {args.interleave}")
    args.peer_num_requests = args.peer_num_requests or args.num_requests
    args.engine_overrides = _engine_overrides(p, args.engine_arg)
    args.standard_rates = [r.strip() for r in args.standard_rates.split(",") if r.strip()]
    for rate in args.standard_rates:
        if rate != "inf" and not _positive_number(rate):
            p.error(f"--standard-rates takes inf or numbers > 0, got {rate!r}")
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    return args


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _engine_overrides(p: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            p.error(f"--engine-arg takes NAME=VALUE, got {pair!r}")
        out[name.strip()] = yaml.safe_load(value)
    return out


def _names(p: argparse.ArgumentParser, flag: str, value: str, known: tuple[str, ...]) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in known]
    if bad:
        p.error(f"{flag} takes some of {','.join(known)}; got {bad}")
    return names


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)



# --------------------------------------------------------------------------- workload


def make_workload(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    scaling = lc.LengthScaling(args.prompt_scale, args.output_scale, args.max_prompt_len,
                               args.max_output_len)
    if args.trace.is_file():
        lengths = lc.trace_lengths(args.trace, args.num_requests, args.seed, scaling)
        warm = lc.trace_lengths(args.trace, max(args.warmup_requests, 1), args.seed + 99, scaling)
        source = (f"lengths sampled from {args.trace.name} (Azure 2023 conversation trace), prompt tokens "
                  f"x{args.prompt_scale:g} (cap {args.max_prompt_len}), output tokens x{args.output_scale:g} "
                  f"(cap {args.max_output_len})")
    else:
        lengths = lc.synthetic_lengths(args.num_requests, args.seed, scaling)
        warm = lc.synthetic_lengths(max(args.warmup_requests, 1), args.seed + 99, scaling)
        source = (f"trace {args.trace} not found: synthetic ShareGPT-like log-normal lengths (median "
                  f"100 in / 90 out, caps {args.max_prompt_len} / {args.max_output_len})")
    vocab, avoid = vocab_size(model_dir), special_ids(model_dir)
    scenarios = {}
    for k, kind in enumerate(lc.ARRIVALS):
        times = lc.arrival_times(len(lengths), kind, args.rate, args.cv, args.seed + 10 + k)
        scenarios[kind] = lc.build_specs(lengths, times, vocab, avoid, args.seed + 100 + k)
    warmup = lc.build_specs(warm[: args.warmup_requests], [0.0] * len(warm), vocab, avoid, args.seed + 99)
    prompts = [p for p, _ in lengths]
    outputs = [o for _, o in lengths]
    return {
        "source": source, "scenarios": scenarios, "warmup": warmup,
        "mean_prompt_len": sum(prompts) / len(prompts), "mean_output_len": sum(outputs) / len(outputs),
        "p50_prompt_len": lc.percentile(prompts, 50), "p50_output_len": lc.percentile(outputs, 50),
        "max_prompt_len": max(prompts), "max_output_len": max(outputs),
    }


def arrival_label(kind: str, args: argparse.Namespace) -> str:
    if kind == "poisson":
        return f"Poisson {args.rate:g} req/s"
    if kind == "bursty":
        return f"Gamma CV {args.cv:g}, {args.rate:g} req/s"
    return "all at t=0"


# --------------------------------------------------------------------------- our cluster


class Ours:
    """A local Ray instance with a directly created worker and the Serve application."""

    def __init__(self, args: argparse.Namespace, model_dir: Path) -> None:
        self.args, self.model_dir = args, model_dir
        self.config: Optional[dict[str, Any]] = None
        self.direct: Any = None
        self.base_url: Optional[str] = None
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        import ray

        from cluster.config import ClusterConfig
        from cluster.serve_env import STREAMING_SERVE_ENV, apply_serve_env, direct_ingress_env
        from cluster.serving import load_serve_config, start
        from workers.worker import Worker

        t0 = time.perf_counter()
        serve_env = apply_serve_env(STREAMING_SERVE_ENV) if self.args.serve_env == "streaming" else {}
        config = load_serve_config(None, str(self.model_dir), 1, free_port(), free_port(), "127.0.0.1",
                                   self.args.ingress, self.args.backend)
        if self.args.ingress == "direct":
            serve_env.update(direct_ingress_env(config["http"]["port"], config["grpc"]["port"]))
            os.environ.update(serve_env)
        ray.init(address="local", num_cpus=self.args.ray_cpus, include_dashboard=False, log_to_driver=False)
        config["cluster"].update(name="bench", worker_cpus=self.args.worker_cpus)
        config["cluster"]["engine"].update(self.args.engine_overrides)
        for name in ("stream_interval_s", "stream_interval_max_s"):
            if getattr(self.args, name) is not None:
                config["cluster"][name] = getattr(self.args, name)
        # No load shedding: the direct path has none, and the bursts must be served, not refused.
        config["router"] = {"served_model_name": self.args.served_model_name, "max_queue_per_worker": 100_000}
        cluster = ClusterConfig.from_dict(config["cluster"])  # exactly what the app's worker runs
        engine = cluster.engine
        self.info = {"engine": {k: v for k, v in vars(engine).items()}, "worker_cpus": self.args.worker_cpus,
                     "ray_cpus": self.args.ray_cpus, "serve_workers": 1, "router_replicas": 1,
                     "stream_interval_s": cluster.stream_interval_s, "stream_full_at": cluster.stream_full_at,
                     "stream_interval_max_s": cluster.stream_interval_max_s, "serve_env": serve_env,
                     "ingress": self.args.ingress}
        if "direct" in self.args.paths:
            self.direct = ray.remote(Worker).options(num_cpus=self.args.worker_cpus).remote(
                cluster.worker_config("bench-direct"))  # as the app's worker runs
            ok, why = ray.get(self.direct.health.remote(), timeout=300)
            if not ok:
                raise RuntimeError(f"the direct worker is unhealthy: {why}")
            # Ray sets OMP_NUM_THREADS from an actor's CPUs; a task with as many shows it.
            # (Nested, so Ray ships it by value: workers cannot import this script.)
            def torch_threads() -> int:
                import torch

                return torch.get_num_threads()

            self.info["worker_torch_threads"] = ray.get(ray.remote(torch_threads).options(
                num_cpus=self.args.worker_cpus).remote())
        if "serve" in self.args.paths or (self.args.peer_scenarios and not self.args.no_peers):
            self.config = config
            self.base_url = start(config)["http"]
            self._wait_healthy()
        self.info["startup_s"] = time.perf_counter() - t0

    def _wait_healthy(self, timeout_s: float = 120.0) -> None:
        url = self.base_url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{url} did not report a healthy worker within {timeout_s:g} s")

    def stop_direct(self) -> None:
        import ray

        if self.direct is not None:
            try:
                ray.get(self.direct.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort; the kill below ends it
                pass
            ray.kill(self.direct)
            self.direct = None

    def stop(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        self.stop_direct()
        if self.config is not None:
            from cluster.serving import stop

            try:
                stop(self.config)
            except Exception as e:  # noqa: BLE001
                say(f"stopping the Serve application: {type(e).__name__}: {e}")
            self.config = None
        ray.shutdown()


async def run_our_load(ours: Ours, workload: dict[str, Any], args: argparse.Namespace
                       ) -> dict[str, dict[str, Any]]:
    """Warm both paths up, then run each scenario through each path, alternating
    which path goes first so slow drift on a shared machine does not favour one."""
    results: dict[str, dict[str, Any]] = {}
    async with contextlib.AsyncExitStack() as stack:
        senders: dict[str, lc.Send] = {}
        if "direct" in args.paths:
            senders["direct"] = lc.WorkerClient(ours.direct).send
        if "serve" in args.paths:
            http = await stack.enter_async_context(lc.HttpClient(ours.base_url, args.served_model_name))
            senders["serve"] = http.send
        for path in args.paths:
            warm = await lc.warm_up(senders[path], workload["warmup"], args.request_timeout_s)
            bad = [o.error for o in warm if not o.ok]
            if bad:
                raise RuntimeError(f"warm-up through {path} failed: {bad[0]}")
        for k, kind in enumerate(args.scenarios):
            specs = workload["scenarios"][kind]
            order = args.paths if k % 2 == 0 else list(reversed(args.paths))
            results[kind] = {}
            runs = None
            if args.interleave:
                say(f"[{kind}] {' and '.join(order)} by turns of {args.interleave}: {len(specs)} requests each, "
                    f"{arrival_label(kind, args)} ...")
                runs = await _run_interleaved(specs, senders, order, args)
            for path in order:
                if runs is None:
                    say(f"[{kind}] {path}: {len(specs)} requests, {arrival_label(kind, args)} ...")
                    outcomes, wall = await lc.run_load(specs, senders[path], args.max_duration_s,
                                                       args.request_timeout_s)
                else:
                    outcomes, wall = runs[path]
                summary = lc.summarize(outcomes, wall)
                say(f"[{kind}] {path}: {summary['completed']}/{summary['requests']} done in {wall:.1f} s, "
                    f"{_f(summary['output_throughput'], 0)} out tok/s, p50 TTFT {_f(summary['p50_ttft_ms'])} ms, "
                    f"p50 TPOT {_f(summary['p50_tpot_ms'], 2)} ms"
                    + (f"; errors: {summary['errors']}" if summary.get("errors") else ""))
                results[kind][path] = {**summary, "ran": order.index(path) + 1, "loadavg_1m": os.getloadavg()[0],
                                       "per_request": lc.compact(outcomes)}
                await asyncio.sleep(0.5)  # let the finished requests' bookkeeping settle
    return results


async def _run_interleaved(specs: list[lc.RequestSpec], senders: dict[str, lc.Send], order: list[str],
                           args: argparse.Namespace) -> dict[str, tuple[list[lc.Outcome], float]]:
    """Each path's outcomes and wall time, the paths taking turns by blocks of
    `args.interleave` requests: every block's arrivals as in the scenario (shifted to
    start at 0), each path's block run to its end before the other's starts."""
    runs: dict[str, tuple[list[lc.Outcome], float]] = {path: ([], 0.0) for path in order}
    due = [s for s in specs if s.at_s <= args.max_duration_s]
    for b in range(0, len(due), args.interleave):
        block = due[b: b + args.interleave]
        shifted = [dataclasses.replace(s, at_s=s.at_s - block[0].at_s) for s in block]
        turn = order if (b // args.interleave) % 2 == 0 else list(reversed(order))
        for path in turn:
            outcomes, wall = await lc.run_load(shifted, senders[path], math.inf, args.request_timeout_s)
            runs[path] = (runs[path][0] + outcomes, runs[path][1] + wall)
    return runs


def router_overhead(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, paths in results.items():
        d, s = paths.get("direct"), paths.get("serve")
        if not d or not s or not d["completed"] or not s["completed"]:
            continue
        row: dict[str, Any] = {}
        for m in ("ttft", "tpot", "e2e"):
            for q in ("p50", "p99"):
                a, b = d.get(f"{q}_{m}_ms"), s.get(f"{q}_{m}_ms")
                row[f"{q}_{m}_added_ms"] = None if a is None or b is None else b - a
        ratio = (s["output_throughput"] / d["output_throughput"]
                 if d["output_throughput"] and s["output_throughput"] else None)
        row["throughput_ratio"] = ratio
        row["latency_target_met"] = all(row[f"p50_{m}_added_ms"] is not None
                                        and row[f"p50_{m}_added_ms"] <= TARGET_ADDED_MS
                                        for m in ("ttft", "tpot", "e2e"))
        row["throughput_target_met"] = ratio is not None and ratio >= 1 - TARGET_THROUGHPUT_LOSS
        row["failed"] = {"direct": d["failed"], "serve": s["failed"]}
        out[kind] = row
    return out


# --------------------------------------------------------------------------- peers


def vllm_flags(kind: str, args: argparse.Namespace, workload: dict[str, Any]) -> list[str]:
    """The same `vllm bench serve` flags for both servers."""
    rate = "inf" if kind == "saturate" else f"{args.rate:g}"
    flags = ["--dataset-name", "random",
             "--random-input-len", str(args.peer_input_len or round(workload["mean_prompt_len"])),
             "--random-output-len", str(args.peer_output_len or round(workload["mean_output_len"])),
             "--random-range-ratio", "0.5",
             "--num-prompts", str(args.peer_num_requests), "--request-rate", rate,
             "--ignore-eos", "--temperature", "0", "--seed", str(args.seed),
             "--num-warmups", str(args.warmup_requests),
             "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
             "--disable-tqdm"]
    if kind == "bursty":
        flags += ["--burstiness", f"{1 / (args.cv * args.cv):.6g}"]
    return flags


def run_peer_bench(server: str, base_url: str, model_dir: Path, args: argparse.Namespace,
                   workload: dict[str, Any], stamp: str, cpu_root: int, with_root: bool = True) -> dict[str, Any]:
    """`vllm bench serve` against one server, per peer scenario, with the CPU seconds
    that the server's processes (cpu_root's tree; the root itself only with_root) spent."""
    out: dict[str, Any] = {}
    for kind in args.peer_scenarios:
        log = args.results_dir / f"serving-{stamp}-bench-{server}-{kind}.log"
        out[kind] = measure_bench(f"{server}] {kind}", base_url, model_dir, vllm_flags(kind, args, workload), log,
                                  args, cpu_root, with_root)
    return out


def measure_bench(label: str, base_url: str, model_dir: Path, flags: list[str], log: Path,
                  args: argparse.Namespace, cpu_root: int, with_root: bool) -> dict[str, Any]:
    """One `vllm bench serve` run: its summary, the server's CPU seconds by process
    role, and every role's (the client's too) CPU seconds per 1,000 output tokens;
    {"error": ...} if the client failed."""
    from cpu_time import by_role, per_1k_tokens
    from peers.vllm_serve import bench_serve

    say(f"[vllm bench serve -> {label} ...")
    before = _server_cpu(cpu_root, with_root)
    client_before = _children_cpu()
    try:
        r = bench_serve(args.peers_python, base_url, args.served_model_name, model_dir, flags, log)
    except Exception as e:  # noqa: BLE001 - report it and carry on with the rest
        say(f"[vllm bench serve -> {label}: FAILED: {e}")
        return {"error": str(e)}
    roles = by_role(before, _server_cpu(cpu_root, with_root))
    r["server_cpu_s"] = sum(roles.values())
    r["server_cpu_s_by_process"] = roles
    r["cpu_s_per_1k_tokens"] = per_1k_tokens(
        roles | {"client (vllm bench serve)": _children_cpu() - client_before}, r.get("total_output_tokens", 0))
    r["log"] = _rel(log)
    r["loadavg_1m"] = os.getloadavg()[0]
    say(f"[vllm bench serve -> {label}: {r.get('completed')} done, "
        f"{_f(r.get('output_throughput'), 0)} out tok/s, median TTFT {_f(r.get('median_ttft_ms'))} ms, "
        f"server CPU {r['server_cpu_s']:.1f} s")
    return r


def _children_cpu() -> float:
    """CPU seconds of this process's ended, waited-for children: the benchmark
    client, whose run ends between two calls (servers still run then)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _server_cpu(root: int, with_root: bool) -> dict[int, "ProcessCPU"]:
    """CPU so far of root's process tree; without the root (this benchmark's own
    process, whose children are our Ray cluster), only its descendants."""
    from cpu_time import tree_cpu

    sample = tree_cpu(root)
    if not with_root:
        sample.pop(root, None)
    return sample


def run_peer_server(name: str, model_dir: Path, args: argparse.Namespace, workload: dict[str, Any],
                    stamp: str) -> dict[str, Any]:
    """One peer server (`vllm serve`, or Ray Serve LLM with the same vLLM), started,
    benchmarked with the same flags as ours, and stopped."""
    from peers.vllm_serve import RayServeLLMServer, VllmServer

    log = args.results_dir / f"serving-{stamp}-{name}-server.log"
    reserved = None if args.vllm_reserved_cpus < 0 else args.vllm_reserved_cpus
    kind = VllmServer if name == "vllm" else RayServeLLMServer
    server = kind(args.peers_python, model_dir, args.served_model_name, free_port(), log, args.vllm_kv_gib, reserved)
    say(f"starting {name} (log {_rel(log)}) ...")
    with server.start(args.vllm_startup_timeout_s):
        say(f"{name} ready in {server.startup_s:.0f} s")
        results = run_peer_bench(name, server.base_url, model_dir, args, workload, stamp, server.proc.pid)
    return {"server_log": _rel(log), "startup_s": server.startup_s, "kv_cache_gib": args.vllm_kv_gib,
            "reserved_cpus": reserved, "results": results}


# --------------------------------------------------------------------------- output


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def _signed(v: Optional[float], digits: int = 2) -> str:
    return "-" if v is None else f"{v:+.{digits}f}"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def format_table(head: list[str], rows: list[list[str]], left: int = 2) -> str:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    head = ["scenario", "path", "done", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
            "E2E p50", "E2E p99"]
    rows = []
    for kind, paths in results.items():
        for path in PATHS:
            r = paths.get(path)
            if r is None:
                continue
            rows.append([kind, path, f"{r['completed']}/{r['requests']}", _f(r["request_throughput"], 2),
                         _f(r["output_throughput"], 0), _f(r["p50_ttft_ms"]), _f(r["p99_ttft_ms"]),
                         _f(r["p50_tpot_ms"], 2), _f(r["p99_tpot_ms"], 2), _f(r["p50_e2e_ms"]),
                         _f(r["p99_e2e_ms"])])
    return format_table(head, rows)


def overhead_table(over: dict[str, Any]) -> str:
    head = ["scenario", "+TTFT p50", "+TPOT p50", "+E2E p50", "+TTFT p99", "+TPOT p99", "+E2E p99",
            "tput serve/direct", "<=2 ms at p50", ">=95% tput"]
    rows = []
    for kind, r in over.items():
        rows.append([kind, _signed(r["p50_ttft_added_ms"]), _signed(r["p50_tpot_added_ms"], 3),
                     _signed(r["p50_e2e_added_ms"]), _signed(r["p99_ttft_added_ms"]),
                     _signed(r["p99_tpot_added_ms"], 3), _signed(r["p99_e2e_added_ms"]),
                     "-" if r["throughput_ratio"] is None else f"{r['throughput_ratio']:.3f}",
                     "met" if r["latency_target_met"] else "NOT met",
                     "met" if r["throughput_target_met"] else "NOT met"])
    return format_table(head, rows, left=1)


def peers_table(servers: dict[str, dict[str, Any]]) -> str:
    """One row per figure; per scenario, each server's value, then ours over each peer."""
    from peers.vllm_serve import SUMMARY_KEYS

    peers = [n for n in servers if n != "ours"]
    kinds = [k for k in servers["ours"] if all(k in servers[n] for n in peers)]
    head = ["metric"]
    for k in kinds:
        head += [f"{k}: {n}" for n in servers] + [f"ours/{n}" for n in peers]
    rows = []
    for key in SUMMARY_KEYS + ("server_cpu_s",):
        row = [key]
        for k in kinds:
            values = {n: servers[n][k].get(key) for n in servers}
            digits = 0 if key in ("completed", "failed") else 2
            row += [_f(v, digits) for v in values.values()]
            for n in peers:
                a, b = values[n], values["ours"]
                # No ratio against (near) zero: vLLM's median ITL is 0 when tokens arrive bunched.
                usable = isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a) >= 0.05
                row.append(f"{b / a:.2f}x" if usable and key not in ("completed", "failed") else "")
        rows.append(row)
    return format_table(head, rows, left=1)


def cpu_table(servers: dict[str, dict[str, Any]]) -> str:
    """Per server and scenario, each process role's CPU seconds per 1,000 output tokens."""
    head = ["server", "scenario", "process", "CPU s / 1k tok"]
    rows = []
    for name, results in servers.items():
        for kind, r in results.items():
            per_role = r.get("cpu_s_per_1k_tokens") or {}
            for role, s in per_role.items():
                if s >= 0.005:  # Ray's idle helpers, a few milliseconds, would crowd the table
                    rows.append([name, kind, role, f"{s:.3f}"])
            if per_role:
                rows.append([name, kind, "all", f"{sum(per_role.values()):.3f}"])
    return format_table(head, rows, left=3)


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    from workers.models.tiny import resolve_model

    model_dir = Path(resolve_model(args.model)).resolve()
    if args.standard:
        return main_standard(args, model_dir, stamp)
    workload = make_workload(args, model_dir)
    say(f"workload: {args.num_requests} requests per scenario; {workload['source']}; "
        f"mean {workload['mean_prompt_len']:.0f} in / {workload['mean_output_len']:.0f} out "
        f"(p50 {workload['p50_prompt_len']:.0f} / {workload['p50_output_len']:.0f}, "
        f"max {workload['max_prompt_len']} / {workload['max_output_len']}); random token-id prompts, "
        f"greedy, EOS ignored")

    report: dict[str, Any] = {
        "benchmark": "serving",
        "workload": {k: v for k, v in workload.items() if k not in ("scenarios", "warmup")}
        | {"num_requests": args.num_requests, "rate": args.rate, "cv": args.cv,
           "scenarios": {k: arrival_label(k, args) for k in args.scenarios},
           "warmup_requests": args.warmup_requests, "seed": args.seed, "model": args.model,
           "served_model_name": args.served_model_name, "max_duration_s": args.max_duration_s,
           "interleave": args.interleave},
        "targets": {"added_p50_ms": TARGET_ADDED_MS, "throughput_loss": TARGET_THROUGHPUT_LOSS},
        "environment": environment("torch", "ray"),
    }
    peers_ok = not args.no_peers and bool(args.peer_scenarios)
    if peers_ok and not args.peers_python.exists():
        reason = f"{_rel(args.peers_python)} not found; `make peers` builds vLLM's CPU build into it"
        say(f"peers: skipped: {reason}")
        report["peers"] = {"skipped": reason}
        peers_ok = False
    elif not peers_ok:
        report["peers"] = {"skipped": "--no-peers" if args.no_peers else "no --peer-scenarios"}
    if not peers_ok:
        args.peer_scenarios = []

    failed = False
    ours = Ours(args, model_dir)
    peer_ours: dict[str, Any] = {}
    try:
        say("starting Ray, the direct worker and the Serve application ...")
        ours.start()
        say(f"ours ready in {ours.info['startup_s']:.0f} s")
        report["ours"] = ours.info
        results = asyncio.run(run_our_load(ours, workload, args))
        report["load"] = results
        report["router_overhead"] = router_overhead(results)
        if peers_ok:
            ours.stop_direct()  # idle, but it should not share the cores with the peer runs
            # Our cluster is this process's children (the local Ray), this process not included.
            peer_ours = run_peer_bench("ours", ours.base_url, model_dir, args, workload, stamp, os.getpid(),
                                       with_root=False)
    except Exception as e:  # noqa: BLE001 - still write what we have
        traceback.print_exc()
        report["error"] = f"{type(e).__name__}: {e}"
        failed = True
    finally:
        ours.stop()

    if peers_ok and not failed:
        try:
            report["peers"] = {"ours": {"results": peer_ours, "backend": args.backend},
                               "flags": {k: vllm_flags(k, args, workload) for k in args.peer_scenarios}}
            for name in args.peers:
                report["peers"][name] = run_peer_server(name, model_dir, args, workload, stamp)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report["peers"] = {"error": f"{type(e).__name__}: {e}", "ours": {"results": peer_ours}}
            failed = True

    print()
    print(f"serving benchmark ({args.model}, served as {args.served_model_name}): {args.num_requests} requests "
          f"per scenario, {workload['source']}")
    print(f"mean {workload['mean_prompt_len']:.0f} prompt / {workload['mean_output_len']:.0f} output tokens; "
          f"random token-id prompts, greedy, ignore_eos; worker: {args.worker_cpus:g} CPUs; times in ms")
    loads = [r["loadavg_1m"] for paths in report.get("load", {}).values() for r in paths.values()]
    loads += [r["loadavg_1m"] for side in ("vllm", "ours") for r in
              report.get("peers", {}).get(side, {}).get("results", {}).values() if "loadavg_1m" in r]
    if loads:
        busy = max(loads) > 2 * (os.cpu_count() or 1) + 1  # this benchmark alone stays below
        print(f"1-minute load average after each run: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} "
              f"cores" + (" -- the machine was busy with other work: trust the ratios less" if busy else ""))
    if report.get("load"):
        hops = "router, worker" if args.ingress == "direct" else "proxy, router, worker"
        print("\nload: direct = Worker actor over Ray from this process; serve = OpenAI HTTP through "
              f"Ray Serve (ingress {args.ingress}: {hops})")
        print(load_table(report["load"], args))
    if report.get("router_overhead"):
        print(f"\nrouter overhead (serve minus direct; targets: <= {TARGET_ADDED_MS:g} ms added at p50, "
              f">= {1 - TARGET_THROUGHPUT_LOSS:.0%} of direct throughput, the latter judged on saturate)")
        print(overhead_table(report["router_overhead"]))
        verdict(report["router_overhead"])
    peers = report.get("peers", {})
    if any(name in peers for name in PEER_SERVERS):
        flags = vllm_flags("saturate", args, workload)
        print(f"\nvllm bench serve against every server, same flags (random dataset, "
              f"{flags[flags.index('--random-input-len') + 1]} in / {flags[flags.index('--random-output-len') + 1]} "
              f"out, range ratio 0.5, {args.peer_num_requests} prompts; poisson = {args.rate:g} req/s, "
              f"saturate = inf); ours runs backend {args.backend}; ratios ours/peer: > 1 is better for "
              f"throughput, worse for latency and CPU")
        servers = {"ours": peers["ours"]["results"]} | {n: peers[n]["results"] for n in PEER_SERVERS if n in peers}
        print(peers_table(servers))
        print("\nCPU seconds per 1,000 output tokens, per process (role), each run of vllm bench serve")
        print(cpu_table(servers))
        print("ITL is per streamed chunk and either server may send several tokens in one chunk (ours sends "
              "a request's tokens at most every stream_interval_s × streaming / stream_full_at, up to "
              "stream_interval_max_s, its first and last at once); "
              "TPOT is the per-token figure to compare")
    elif "skipped" in peers:
        print(f"\npeers: skipped: {peers['skipped']}")
    elif "error" in peers:
        print(f"\npeers: FAILED: {peers['error']}")

    out = args.results_dir / f"serving-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {_rel(out)}")
    return 1 if failed or "error" in report else 0


def main_standard(args: argparse.Namespace, model_dir: Path, stamp: str) -> int:
    import serving_standard as standard

    if not args.peers_python.exists():
        say(f"--standard needs vLLM: {_rel(args.peers_python)} not found; `make peers` builds it")
        return 2
    report: dict[str, Any] = {"benchmark": "serving --standard", "backend": args.backend,
                              "environment": environment("torch", "ray"), "model": args.model}
    failed = False
    try:
        report["standard"] = standard.run(args, model_dir, stamp)
    except Exception as e:  # noqa: BLE001 - still write what we have
        traceback.print_exc()
        report["error"] = f"{type(e).__name__}: {e}"
        failed = True
    if "standard" in report:
        print(f"\nstandard serving comparison ({args.model}, ours runs backend {args.backend}), "
              f"{args.repeat} run(s), servers in rotated order; one worker, {args.worker_cpus:g} CPUs")
        print(standard.report_tables(report["standard"]))
    out = args.results_dir / f"serving-standard-{stamp}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {_rel(out)}")
    return 1 if failed else 0


def verdict(over: dict[str, Any]) -> None:
    lat = {k: r["latency_target_met"] for k, r in over.items()}
    sat = over.get("saturate")
    lines = [f"  p50 latency added <= {TARGET_ADDED_MS:g} ms: "
             + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in lat.items())]
    if sat is not None and sat["throughput_ratio"] is not None:
        lines.append(f"  throughput at saturation: serve/direct = {sat['throughput_ratio']:.3f} "
                     f"({'met' if sat['throughput_target_met'] else 'NOT met'})")
    print("\n".join(lines))


if __name__ == "__main__":  # vLLM's spawn re-imports __main__ only in its subprocesses
    sys.exit(main())
