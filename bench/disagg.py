"""Prefill/decode disaggregation against colocated serving: goodput, DistServe's way.

Arms of two workers each, run point after point in the same run (so that the
machine's noise falls on all), each worker pinned to a core of its own with one torch
thread, as two GPUs would not share compute:

  pd         1 prefill + 1 decode worker. Every request is prefilled on the first and
             handed off, its KV streamed layer by layer while the prompt computes, to
             the second.
  pd_chunk   the same, streamed a whole forward (chunk) at a time: what streaming
             each layer buys.
  pd_after   the same, the KV copied after the prefill (DistServe's and vLLM's
             connectors' way): what streaming buys.
  colocated  2 mixed workers with chunked prefill; each request goes to the one with
             fewer requests in flight.

Both arms use the same chunk size (--chunk). The client is this process, through the
router's own request state machine (RequestStream over WorkerLinks, following Moved);
no HTTP, proxy or router replica, so the arms differ only in the workers' layout.
The driver, Ray's own processes and the workers share the machine's cores: only the
two workers are pinned.

Method (DistServe):
  * SLOs from unloaded runs of the colocated arm: TTFT = 2 x the unloaded TTFT at
    --ttft-basis, TPOT = --tpot-factor x the median unloaded TPOT (a decode step).
    DistServe took 2x the median prefill; the trace's prompt lengths have a heavy tail
    (the longest are 2-3x the median), so that even unloaded some 20% of requests
    would miss it and no rate would reach 90%. The default basis is therefore the
    90th percentile; --ttft-basis median gives DistServe's.
  * The colocated arm's saturation rate: requests/s with every request sent at once.
  * A sweep of Poisson rates, --rate-fractions of that saturation rate, about
    --requests-per-worker requests per worker per point, lengths from the Azure 2023
    conversation trace, scaled.
  * Attainment = share of requests meeting both SLOs; goodput = the per-worker rate
    where attainment crosses 90%, interpolated.
  * The SLO-scale sweep: attainment at one rate with both SLOs scaled (1.6 ... 0.4),
    from that point's requests.
  * The five-part breakdown (prefill queue, prefill, transfer, decode queue, decode),
    from the workers' phase totals, and transfer as a share of end-to-end latency.

    python bench/disagg.py                                  # about an hour on 2 cores
    python bench/disagg.py --arms pd,colocated --requests-per-worker 40 --rate-fractions 0.05,0.1,0.2,0.4

Target (issue 12): goodput >= 2x colocated, transfer <= 5% of end-to-end latency.
Writes JSON to bench/results/disagg-<timestamp>.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import load_client as lc  # noqa: E402
from environment import environment, write_results  # noqa: E402
from goodput import SLO, Latency, attainment, goodput, median  # noqa: E402
from workload import special_ids, vocab_size  # noqa: E402

PHASES = ("prefill_queue", "prefill", "transfer", "decode_queue", "decode")
ARMS = {"pd": (("p0", "prefill"), ("d0", "decode")), "pd_chunk": (("r0", "prefill"), ("f0", "decode")),
        "pd_after": (("q0", "prefill"), ("e0", "decode")), "colocated": (("m0", "mixed"), ("m1", "mixed"))}
WORKER_SETTINGS = {"q0": {"handoff_streaming": False}, "r0": {"handoff_stream_unit": "chunk"}}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--trace", type=Path, default=REPO.parent / "shared" / "traces" / "azure2023_conv.csv")
    p.add_argument("--prompt-scale", type=float, default=0.5)
    p.add_argument("--output-scale", type=float, default=0.5)
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens of every worker")
    p.add_argument("--requests-per-worker", type=int, default=100)
    # The saturation rate is a burst's (every request at once); open-loop Poisson load
    # misses the SLOs well below it on 2 cores, so the sweep sits low.
    p.add_argument("--rate-fractions", type=floats, default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8])
    p.add_argument("--slo-scales", type=floats, default=[1.6, 1.4, 1.2, 1.0, 0.8, 0.6, 0.4])
    p.add_argument("--slo-rate-fraction", type=float, default=0.2, help="the sweep point of the SLO-scale sweep")
    p.add_argument("--tpot-factor", type=float, default=4.0)
    p.add_argument("--ttft-basis", choices=("median", "p90"), default="p90")
    p.add_argument("--calibration-requests", type=int, default=24)
    p.add_argument("--saturation-requests", type=int, default=80)
    p.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def pinned_worker_class() -> type:
    """A Worker whose process runs on one core with one torch thread. Defined here so
    that it travels to the worker process by value."""
    from workers.worker import Worker

    class PinnedWorker(Worker):
        def __init__(self, config: Any, core: int) -> None:
            import torch

            for tid in os.listdir("/proc/self/task"):  # every thread so far; later ones inherit
                try:
                    os.sched_setaffinity(int(tid), {core})
                except OSError:
                    pass
            torch.set_num_threads(1)
            super().__init__(config)

    return PinnedWorker


def start_workers(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    import ray

    from workers.engine.config import EngineConfig
    from workers.events import ACTOR_NAMESPACE, worker_actor_name
    from workers.worker import WorkerConfig

    cores = sorted(os.sched_getaffinity(0))
    cls = ray.remote(pinned_worker_class())
    handles = {}
    for arm in args.arms:
        for i, (wid, role) in enumerate(ARMS[arm]):
            engine = EngineConfig(model=str(model_dir), max_num_batched_tokens=args.chunk, kv_cache_memory_gib=0.5)
            handles[wid] = cls.options(num_cpus=0.5, name=worker_actor_name(wid), namespace=ACTOR_NAMESPACE) \
                .remote(WorkerConfig(wid, engine, role=role, **WORKER_SETTINGS.get(wid, {})), cores[i % len(cores)])
    ray.get([h.load.remote() for h in handles.values()])
    return handles


class ArmClient:
    """Sends requests to one arm the way a router replica does, and measures them."""

    def __init__(self, arm: str, handles: dict[str, Any]) -> None:
        from router.worker_link import WorkerLink

        self.arm = arm
        self.ids = [wid for wid, _ in ARMS[arm]]
        self.links = {wid: WorkerLink(wid, handles[wid]) for wid in self.ids}
        self.in_flight = {wid: 0 for wid in self.ids}
        self.count = 0

    def pick(self, excluded: frozenset[str]) -> tuple[str, Any]:
        if self.arm != "colocated":
            wid = next(w for w in self.ids if w not in excluded)
        else:
            wid = min((w for w in self.ids if w not in excluded), key=lambda w: self.in_flight[w])
        return wid, self.links[wid]

    async def send(self, spec: lc.RequestSpec, outcome: lc.Outcome) -> None:
        from router.lifecycle import RequestStream
        from workers.events import Failed, Finished, Tokens, WorkerRequest
        from workers.sampling_params import SamplingParams

        self.count += 1
        request = WorkerRequest(f"{self.arm}-{self.count}-{spec.index}", spec.prompt_token_ids,
                                SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True),
                                handoff_to=self.ids[1] if self.arm != "colocated" else None)

        async def no_report(_: str) -> None:
            return None

        first, link = self.pick(frozenset())
        stream = RequestStream(request, lambda excluded: (first, link) if not excluded else self.pick(excluded),
                               lambda lk, req, attach: lk.stream(req, attach), no_report, 3, self.links.get)
        self.in_flight[first] += 1
        t0 = time.perf_counter()
        try:
            async for event in stream.events():
                if isinstance(event, Tokens):
                    if outcome.ttft_s is None:
                        outcome.ttft_s = time.perf_counter() - t0
                    outcome.output_tokens += len(event.token_ids)
                elif isinstance(event, Finished):
                    outcome.ok = outcome.error is None
                elif isinstance(event, Failed):
                    outcome.error = f"{event.code}: {event.message}"[:300]
        finally:
            self.in_flight[first] -= 1
        outcome.e2e_s = time.perf_counter() - t0

    def close(self) -> None:
        for link in self.links.values():
            link.close()


def latencies(outcomes: list[lc.Outcome]) -> list[Latency]:
    return [Latency(o.ttft_s, o.tpot_s, o.ok) for o in outcomes]


async def run_point(client: ArmClient, handles: dict[str, Any], specs: list[lc.RequestSpec]) -> dict[str, Any]:
    before = [await handles[w].phase_totals.remote() for w in client.ids]
    outcomes, wall = await lc.run_load(specs, client.send, max_duration_s=3600, request_timeout_s=600)
    after = [await handles[w].phase_totals.remote() for w in client.ids]
    summary = lc.summarize(outcomes, wall)
    return {"outcomes": outcomes, "wall_s": wall, "summary": summary, "phases": phase_means(before, after)}


def phase_means(before: list[dict], after: list[dict]) -> dict[str, Optional[float]]:
    """Mean seconds per request in each phase, and copy times, over the arm's workers."""
    out: dict[str, Optional[float]] = {}
    keys = set().union(*after)
    for key in sorted(keys):
        count = sum(a.get(key, (0, 0.0))[0] - b.get(key, (0, 0.0))[0] for a, b in zip(after, before))
        total = sum(a.get(key, (0, 0.0))[1] - b.get(key, (0, 0.0))[1] for a, b in zip(after, before))
        out[key] = total / count if count else None
        out[key + "_total_s"] = total
    return out


async def calibrate(args: argparse.Namespace, clients: dict[str, ArmClient], handles: dict[str, Any],
              specs: list[lc.RequestSpec]) -> dict[str, Any]:
    """Unloaded: one request at a time, on each arm."""
    unloaded = {}
    for arm, client in clients.items():
        outcomes = []
        for spec in specs:
            point = await run_point(client, handles,
                                    [lc.RequestSpec(spec.index, spec.prompt_token_ids, spec.output_len, 0.0)])
            outcomes.extend(point["outcomes"])
        ok = [o for o in outcomes if o.ok]
        unloaded[arm] = {"median_ttft_s": median([o.ttft_s for o in ok]),
                         "p90_ttft_s": lc.percentile([o.ttft_s for o in ok], 90),
                         "median_tpot_s": median([o.tpot_s for o in ok if o.tpot_s is not None]),
                         "median_e2e_s": median([o.e2e_s for o in ok])}
    base = unloaded["colocated"]
    slo = SLO(2 * base[f"{args.ttft_basis}_ttft_s"], args.tpot_factor * base["median_tpot_s"])
    return {"unloaded": unloaded, "slo": slo}


async def saturation_rate(client: ArmClient, handles: dict[str, Any], specs: list[lc.RequestSpec]) -> float:
    point = await run_point(client, handles, [lc.RequestSpec(s.index, s.prompt_token_ids, s.output_len, 0.0)
                                        for s in specs])
    done = sum(o.ok for o in point["outcomes"])
    return done / point["wall_s"]


def sweep_row(arm: str, fraction: float, rate: float, point: dict[str, Any], slo: SLO) -> dict[str, Any]:
    lat = latencies(point["outcomes"])
    s = point["summary"]
    e2e = [o.e2e_s for o in point["outcomes"] if o.ok]
    mean_e2e = sum(e2e) / len(e2e) if e2e else None
    phases = point["phases"]
    transfer = phases.get("transfer")
    return {"arm": arm, "rate_fraction": fraction, "rate_per_worker": rate / 2, "requests": len(lat),
            "attainment": attainment(lat, slo), "ttft_attainment": attainment(lat, SLO(slo.ttft_s, float("inf"))),
            "tpot_attainment": attainment(lat, SLO(float("inf"), slo.tpot_s)),
            "failed": sum(not x.ok for x in lat), "p50_ttft_s": ms(s["p50_ttft_ms"]), "p99_tpot_s": ms(s["p99_tpot_ms"]),
            "mean_e2e_s": mean_e2e, "phases": {p: phases.get(p) for p in PHASES},
            "transfer_share_of_e2e": transfer / mean_e2e if transfer is not None and mean_e2e else None,
            "kv_copy_mean_s": phases.get("kv_copy_handoff"), "kv_copy_hidden_mean_s": phases.get("kv_copy_hidden_handoff")}


def ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else x / 1000


def fmt(x: Optional[float], scale: float = 1000.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def print_row(r: dict[str, Any]) -> None:
    ph = r["phases"]
    print(f"{r['arm']:>9} {r['rate_fraction']:5.2f} {r['rate_per_worker']:7.2f} {r['attainment']:6.2f} "
          f"{r['ttft_attainment']:5.2f} {r['tpot_attainment']:5.2f} {fmt(r['p50_ttft_s']):>8} {fmt(r['p99_tpot_s']):>8} "
          f"{fmt(r['mean_e2e_s']):>8} | " + " ".join(f"{fmt(ph[p]):>7}" for p in PHASES)
          + f" | {fmt(r['transfer_share_of_e2e'], 100, 2):>6}", flush=True)


HEADER = (f"{'arm':>9} {'frac':>5} {'req/s/w':>7} {'attain':>6} {'ttft':>5} {'tpot':>5} {'p50TTFT':>8} "
          f"{'p99TPOT':>8} {'meanE2E':>8} | " + " ".join(f"{p[:7]:>7}" for p in PHASES) + f" | {'xfer%':>6}"
          "\n(times in ms; attain/ttft/tpot: shares meeting both SLOs / the TTFT SLO / the TPOT SLO; "
          "phases: mean per request that had that phase)")


async def sweep(args: argparse.Namespace, handles: dict[str, Any], lengths: Any, vocab: int,
                avoid: tuple[int, ...]) -> tuple[dict[str, Any], float, list[dict[str, Any]], dict]:
    """Warm-up, calibration, saturation, then the rates, each arm in turn at each rate."""
    n = 2 * args.requests_per_worker
    clients = {arm: ArmClient(arm, handles) for arm in args.arms}
    try:
        warm = lc.build_specs(lengths(8, args.seed + 7), [0.0] * 8, vocab, avoid, args.seed + 7)
        for client in clients.values():
            await run_point(client, handles, warm)
        cal = await calibrate(args, clients, handles,
                              lc.build_specs(lengths(args.calibration_requests, args.seed + 1),
                                             [0.0] * args.calibration_requests, vocab, avoid, args.seed + 1))
        slo = cal["slo"]
        print(f"unloaded: {cal['unloaded']}\nSLO: TTFT {slo.ttft_s * 1000:.1f} ms, TPOT {slo.tpot_s * 1000:.2f} ms",
              flush=True)
        sat = await saturation_rate(clients["colocated"], handles,
                                    lc.build_specs(lengths(args.saturation_requests, args.seed + 2),
                                                   [0.0] * args.saturation_requests, vocab, avoid, args.seed + 2))
        print(f"colocated saturation: {sat:.2f} requests/s ({sat / 2:.2f} per worker)\n{HEADER}", flush=True)
        rows, points = [], {}
        sweep_lengths = lengths(n, args.seed + 3)
        for k, fraction in enumerate(args.rate_fractions):
            rate = fraction * sat
            # New prompt tokens at every rate: a prompt seen before would hit the prefix cache.
            specs = lc.build_specs(sweep_lengths, lc.arrival_times(n, "poisson", rate, 1.0, args.seed + 10 + k),
                                   vocab, avoid, args.seed + 100 + k)
            for arm, client in clients.items():
                point = await run_point(client, handles, specs)
                points[(arm, fraction)] = point
                row = sweep_row(arm, fraction, rate, point, slo)
                rows.append(row)
                print_row(row)
        return cal, sat, rows, points
    finally:
        for client in clients.values():
            client.close()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import ray

    from workers.models.tiny import resolve_model

    model_dir = Path(resolve_model(args.model))
    scaling = lc.LengthScaling(args.prompt_scale, args.output_scale, args.max_prompt_len, args.max_output_len)
    n = 2 * args.requests_per_worker
    vocab, avoid = vocab_size(model_dir), special_ids(model_dir)

    def lengths(count: int, seed: int) -> list[tuple[int, int]]:
        return (lc.trace_lengths(args.trace, count, seed, scaling) if args.trace.is_file()
                else lc.synthetic_lengths(count, seed, scaling))

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    handles = start_workers(args, model_dir)
    print(f"{args.model}; two workers per arm, each pinned to its own core with one torch thread "
          f"(the driver and Ray share the cores); chunk {args.chunk} tokens; lengths from "
          f"{args.trace.name if args.trace.is_file() else 'a synthetic log-normal'} x{args.prompt_scale} in, "
          f"x{args.output_scale} out; {n} requests per point", flush=True)
    try:
        cal, sat, rows, points = asyncio.run(sweep(args, handles, lengths, vocab, avoid))
    finally:
        for h in handles.values():
            ray.kill(h)
        ray.shutdown()
    report = summarize(args, cal, sat, rows, points)
    write_results({"environment": environment("torch", "ray"),
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   **report}, "disagg", args.json)
    return 0


def summarize(args: argparse.Namespace, cal: dict[str, Any], sat: float, rows: list[dict[str, Any]],
              points: dict[tuple[str, float], dict[str, Any]]) -> dict[str, Any]:
    slo = cal["slo"]
    good = {arm: goodput([(r["rate_per_worker"], r["attainment"]) for r in rows if r["arm"] == arm])
            for arm in args.arms}
    fraction = min(args.rate_fractions, key=lambda f: abs(f - args.slo_rate_fraction))
    scales = {arm: {s: attainment(latencies(points[(arm, fraction)]["outcomes"]), slo.scaled(s))
                    for s in args.slo_scales} for arm in args.arms}
    base = good.get("colocated")
    ratios = {arm: g / base if g is not None and base else None for arm, g in good.items() if arm != "colocated"}
    print("\ngoodput (requests/s per worker at 90% attainment): "
          + ", ".join(f"{arm} {g if g is None else round(g, 3)}" for arm, g in good.items())
          + "; against colocated: " + ", ".join(f"{arm} {r if r is None else round(r, 2)}x" for arm, r in ratios.items()))
    print(f"SLO-scale sweep at {fraction:.2f} of saturation (attainment):")
    for arm in args.arms:
        print(f"  {arm:>9}: " + "  ".join(f"x{s}: {a:.2f}" for s, a in scales[arm].items()))
    for arm in args.arms:
        shares = [r["transfer_share_of_e2e"] for r in rows if r["arm"] == arm and r["transfer_share_of_e2e"] is not None]
        copies = [(r["kv_copy_mean_s"], r["kv_copy_hidden_mean_s"]) for r in rows if r["arm"] == arm
                  and r["kv_copy_mean_s"]]
        if shares and copies:
            total, hidden = sum(c for c, _ in copies), sum(h or 0.0 for _, h in copies)
            print(f"{arm}: transfer (first token to commit) at most {max(shares) * 100:.2f}% of end-to-end latency; "
                  f"KV copy per handoff {total / len(copies) * 1000:.1f} ms, {hidden / total * 100:.0f}% of it "
                  f"while the prompt still computed (overlapped)")
    return {"unloaded": cal["unloaded"], "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "colocated_saturation_rps": sat, "rows": rows, "goodput_per_worker": good, "goodput_vs_colocated": ratios,
            "slo_scale_sweep": {"rate_fraction": fraction, "attainment": scales}}


if __name__ == "__main__":
    sys.exit(main())
