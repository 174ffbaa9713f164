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


def profile(model: str, out: Path, device: str, dtype: Optional[str], block_size: int, repeats: int,
            transfer_bytes_per_s: Optional[float], transfer_latency_s: float) -> StepTimeModel:
    from cluster.sim.profile import profile as measure

    result = measure(model, device, dtype, block_size, repeats, transfer_bytes_per_s, transfer_latency_s)
    result.model.save(out)
    print(f"fitted over {len(result.samples)} batch shapes, mean error {result.mean_relative_error():.1%}; "
          f"wrote {out}")
    return result.model
