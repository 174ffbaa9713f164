"""The simulation's pictures: latency CDFs, and each worker's load over time."""

from __future__ import annotations

from pathlib import Path

from cluster.sim.results import SimResult


def plot(result: SimResult, out_dir: Path, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    done = [r for r in result.requests if r.status == "ok"]
    latency = out_dir / "latency_cdf.png"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, values) in zip(axes, (("TTFT", [r.ttft_s for r in done]), ("TPOT", [r.tpot_s for r in done]),
                                         ("end-to-end", [r.e2e_s for r in done]))):
        xs = sorted(v for v in values if v is not None)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))])
        ax.set_xlabel(f"{name} (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "latency")
    fig.tight_layout()
    fig.savefig(latency, dpi=100)
    plt.close(fig)

    load = out_dir / "load_per_worker.png"
    fig, (kv, queue) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    by_worker: dict[str, list] = {}
    for s in result.samples:
        by_worker.setdefault(s.worker_id, []).append(s)
    for wid, samples in sorted(by_worker.items()):
        label = f"{wid} ({samples[0].role})"
        times = [s.time_s for s in samples]
        kv.plot(times, [s.used_blocks / s.total_blocks for s in samples], label=label, lw=0.8)
        queue.plot(times, [s.running + s.waiting for s in samples], label=label, lw=0.8)
    kv.set_ylabel("KV cache in use (fraction)")
    queue.set_ylabel("requests (running + waiting)")
    queue.set_xlabel("simulated time (s)")
    if len(by_worker) <= 12:
        kv.legend(fontsize="small", ncol=2)
    for ax in (kv, queue):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(load, dpi=100)
    plt.close(fig)
    return [latency, load]
