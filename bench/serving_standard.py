"""The standard serving comparison (`bench/serving.py --standard`): `vllm bench serve`'s
random workload, the one every serving comparison users read is run on.

200 prompts of 256 random tokens, 128 output tokens each (EOS ignored, greedy), sent
all at once (rate inf) and as Poisson arrivals at 2 and 8 requests/s, against three
servers in one invocation: `vllm serve`, and yard (`yard serve --workers 1`, one
worker) with Serve's proxy and with direct ingress. The same client and flags hit
every server. Each run starts every server afresh, in a rotated order, so that slow
drift on a shared machine favours none. Per rate and server it reports output
tokens/s, TTFT, TPOT and ITL at p50 and p99, and the CPU seconds per 1,000 output
tokens that each process spent (the client's too), for every run, and yard's ratios
to `vllm serve` within each run; the ratios are the figures to read. For yard it also
reads the router replica's own mean TTFT (from its metrics: from the request's
dispatch to its first token there): the client's mean TTFT less the router's is the
time spent on the way in (ingress, parsing, tokenizing) and out (encoding, the relay).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from pathlib import Path
from typing import Any, Iterator

SERVERS = ("vllm", "ours-proxy", "ours-direct")
RATES = ("inf", "2", "8")
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 200, 256, 128
ROWS = ("completed", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "mean_ttft_ms", "router_mean_ttft_ms",
        "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")
ROUTER_TTFT = "ray_yard_router_time_to_first_token_seconds"


def flags(rate: str, seed: int, warmups: int) -> list[str]:
    """The client's flags, the same for every server."""
    return ["--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(NUM_PROMPTS),
            "--request-rate", rate, "--ignore-eos", "--temperature", "0", "--seed", str(seed),
            "--num-warmups", str(warmups), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm"]


def run(args: argparse.Namespace, model_dir: Path, stamp: str) -> dict[str, Any]:
    """Every run: each server started, benchmarked at each rate, stopped.
    Returns {"runs": [{server: {rate: result}}], "order": [...], "flags": {...}}."""
    from serving import say

    runs: list[dict[str, dict[str, Any]]] = []
    orders = []
    for k in range(args.repeat):
        order = SERVERS[k % len(SERVERS):] + SERVERS[:k % len(SERVERS)]
        orders.append(list(order))
        results: dict[str, dict[str, Any]] = {}
        for server in order:
            say(f"[standard run {k + 1}/{args.repeat}] {server} ...")
            with _started(server, args, model_dir, f"{stamp}-run{k + 1}") as (base_url, cpu_root, with_root):
                results[server] = {rate: _bench(server, rate, base_url, cpu_root, with_root, args, model_dir,
                                                f"{stamp}-run{k + 1}") for rate in args.standard_rates}
        runs.append(results)
    return {"runs": runs, "order": orders, "flags": {r: flags(r, args.seed, args.warmup_requests)
                                                    for r in args.standard_rates}}


@contextlib.contextmanager
def _started(server: str, args: argparse.Namespace, model_dir: Path, stamp: str) -> Iterator[tuple[str, int, bool]]:
    """(base URL, root pid of the server's processes, whether the root itself counts)."""
    from serving import Ours, free_port, say

    if server == "vllm":
        from peers.vllm_serve import VllmServer

        log = args.results_dir / f"serving-{stamp}-vllm-server.log"
        reserved = None if args.vllm_reserved_cpus < 0 else args.vllm_reserved_cpus
        peer = VllmServer(args.peers_python, model_dir, args.served_model_name, free_port(), log,
                          args.vllm_kv_gib, reserved)
        with peer.start(args.vllm_startup_timeout_s):
            say(f"vllm serve ready in {peer.startup_s:.0f} s")
            yield peer.base_url, peer.proc.pid, True
        return
    # Ours: a local Ray of its own per start, since direct ingress is set in the
    # environment before Ray starts; the environment is put back afterwards.
    saved = dict(os.environ)
    ours = Ours(argparse.Namespace(**{**vars(args), "ingress": server.removeprefix("ours-"), "paths": ["serve"]}),
                model_dir)
    try:
        ours.start()
        say(f"{server} ready in {ours.info['startup_s']:.0f} s")
        # Our cluster is this process's children (the local Ray), this process not included.
        yield ours.base_url, os.getpid(), False
    finally:
        ours.stop()
        os.environ.clear()
        os.environ.update(saved)


def _bench(server: str, rate: str, base_url: str, cpu_root: int, with_root: bool, args: argparse.Namespace,
           model_dir: Path, stamp: str) -> dict[str, Any]:
    from serving import measure_bench

    log = args.results_dir / f"serving-{stamp}-bench-{server}-rate{rate}.log"
    router_before = _router_ttft() if server != "vllm" else None
    result = measure_bench(f"{server}] rate {rate}", base_url, model_dir,
                           flags(rate, args.seed, args.warmup_requests), log, args, cpu_root, with_root)
    if router_before is not None and result.get("completed"):
        result["router_mean_ttft_ms"] = _router_mean_ttft_ms(router_before, result["completed"])
    return result


def _router_ttft() -> tuple[float, float]:
    """(sum, count) of the router replicas' TTFT histogram, from Ray's metrics agent."""
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker._global_node.metrics_export_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    totals = {"_sum": 0.0, "_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for suffix in totals:
                if sample.name == ROUTER_TTFT + suffix:
                    totals[suffix] += sample.value
    return totals["_sum"], totals["_count"]


def _router_mean_ttft_ms(before: tuple[float, float], completed: int, timeout_s: float = 60.0) -> float | None:
    """The router's mean TTFT over the requests since `before` (the client's warm-up
    requests included), once Ray's metrics agent has exported them all: it exports
    every few seconds. None if it has not within timeout_s."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        total, count = _router_ttft()
        if count - before[1] >= completed:
            return 1000 * (total - before[0]) / (count - before[1])
        if time.monotonic() > deadline:
            return None
        time.sleep(1.0)


# --------------------------------------------------------------------------- output


def report_tables(standard: dict[str, Any]) -> str:
    from serving import _f, format_table

    runs = standard["runs"]
    rates = list(next(iter(runs[0].values())))
    out = []
    for rate in rates:
        head = ["metric"] + [f"{s} #{k + 1}" for s in SERVERS for k in range(len(runs))]
        head += [f"{s}/vllm #{k + 1}" for s in SERVERS[1:] for k in range(len(runs))]
        rows = []
        for key in ROWS:
            row = [key]
            for s in SERVERS:
                row += [_f(run[s][rate].get(key), 0 if key == "completed" else 1) for run in runs]
            for s in SERVERS[1:]:
                row += [_ratio(run[s][rate].get(key), run["vllm"][rate].get(key), key) for run in runs]
            rows.append(row)
        rows.append(["server CPU s/1k tok"] + [_f(_cpu_total(run[s][rate]), 3) for s in SERVERS for run in runs]
                    + [_ratio(_cpu_total(run[s][rate]), _cpu_total(run["vllm"][rate]), "cpu") for s in SERVERS[1:]
                       for run in runs])
        label = "all at once (rate inf)" if rate == "inf" else f"Poisson {rate} req/s"
        out.append(f"\n{label}: {NUM_PROMPTS} prompts x {INPUT_LEN} in / {OUTPUT_LEN} out; times in ms\n"
                   + format_table(head, rows, left=1))
    out.append("\nmedians over the runs of ours/vllm (each ratio within one run):")
    for rate in rates:
        parts = []
        for s in SERVERS[1:]:
            for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
                ratios = [run[s][rate][key] / run["vllm"][rate][key] for run in runs
                          if run[s][rate].get(key) and run["vllm"][rate].get(key)]
                if ratios:
                    parts.append(f"{s} {key} {statistics.median(ratios):.2f}x")
        out.append(f"  rate {rate}: " + ", ".join(parts))
    out.append("\nCPU seconds per 1,000 output tokens by process, first run (client: vllm bench serve, "
               "with its start-up)")
    for s in SERVERS:
        for rate in rates:
            roles = runs[0][s][rate].get("cpu_s_per_1k_tokens") or {}
            shown = ", ".join(f"{role} {v:.3f}" for role, v in roles.items() if v >= 0.005)
            out.append(f"  {s} @ {rate}: {shown}")
    return "\n".join(out)


def _cpu_total(result: dict[str, Any]) -> float | None:
    roles = result.get("cpu_s_per_1k_tokens")
    if not roles:
        return None
    return sum(v for role, v in roles.items() if not role.startswith("client"))


def _ratio(a: Any, b: Any, key: str) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or abs(b) < 0.05 or key == "completed":
        return ""
    return f"{a / b:.2f}x"
