"""What `yard simulate` and `yard profile` do, given their parsed arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from cluster.sim.cluster import SimOptions, Simulation, load_sim_config
from cluster.sim.step_time import StepTimeModel
from cluster.sim.trace import TraceScale, read_trace


def simulate(trace: Path, config: Optional[Path], step_time: Path, scale: TraceScale, options: SimOptions,
             out_dir: Optional[Path], slo_ttft_s: Optional[float], slo_tpot_s: Optional[float],
             plots: bool) -> dict[str, Any]:
    """Run one simulation; print its summary (JSON) and write its files under out_dir."""
    cluster, router = load_sim_config(config)
    timing = StepTimeModel.load(step_time)
    requests = read_trace(trace, scale)
    result = Simulation(cluster, router, timing, requests, options).run()
    summary = {"trace": str(trace), "scale": vars(scale), "config": str(config) if config else None,
               "step_time": str(step_time), **result.summary(slo_ttft_s, slo_tpot_s)}
    print(json.dumps(summary, indent=2))
    if out_dir is not None:
        written = result.write(out_dir, summary)
        if plots:
            from cluster.sim.plot import plot

            written += plot(result, out_dir, f"{cluster.name}: {trace.name}, {router.policy}")
        print("wrote " + ", ".join(str(p) for p in written))
    return summary


def sweep(trace: Path, config: Optional[Path], step_time: Path, scale: TraceScale, options: SimOptions,
          out_dir: Optional[Path], slo_ttft_s: float, slo_tpot_s: float, attainment: float, max_workers: int,
          split: bool) -> Optional[dict[str, Any]]:
    """Search layouts for the cheapest that meets the SLOs; print each as it is simulated."""
    from cluster.sim.sweep import SweepRow, sweep as search

    cluster, router = load_sim_config(config)
    timing = StepTimeModel.load(step_time)
    requests = read_trace(trace, scale)
    print(f"{len(requests)} requests; SLOs TTFT <= {slo_ttft_s} s, TPOT <= {slo_tpot_s} s for "
          f"{attainment:.0%} of them; up to {max_workers} workers")
    print(f"{'layout':>12}{'attained':>10}{'goodput req/s':>15}{'p99 TTFT s':>12}{'p99 TPOT s':>12}")

    def show(row: SweepRow) -> None:
        s = row.summary
        print(f"{str(row.layout):>12}{row.attainment:>10.1%}{row.goodput:>15.2f}{_num(s['ttft_s']['p99']):>12}"
              f"{_num(s['tpot_s']['p99']):>12}", flush=True)
    best, rows = search(cluster, router, timing, requests, slo_ttft_s, slo_tpot_s, attainment, max_workers, split,
                        options, show)
    ranks = cluster.engine.tensor_parallel_size
    answer = None if best is None else {"layout": str(best.layout), "workers": best.layout.workers,
                                        "ranks": best.layout.workers * ranks, "attainment": best.attainment,
                                        "goodput_req_s": best.goodput}
    print(f"cheapest: {best.layout} ({best.layout.workers} workers, {best.layout.workers * ranks} ranks)"
          if best else f"no layout of at most {max_workers} workers meets the SLOs")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "sweep.json"
        path.write_text(json.dumps({"answer": answer, "rows": [
            {"layout": str(r.layout), "attainment": r.attainment, **r.summary} for r in rows]}, indent=2) + "\n")
        print(f"wrote {path}")
    return answer


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def profile(model: str, out: Path, device: str, dtype: Optional[str], block_size: int, repeats: int,
            transfer_bytes_per_s: Optional[float], transfer_latency_s: float) -> StepTimeModel:
    from cluster.sim.profile import profile as measure

    result = measure(model, device, dtype, block_size, repeats, transfer_bytes_per_s, transfer_latency_s)
    result.model.save(out)
    print(f"fitted over {len(result.samples)} batch shapes, mean error {result.mean_relative_error():.1%}; "
          f"wrote {out}")
    return result.model
