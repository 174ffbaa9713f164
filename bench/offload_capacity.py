"""Attention offloading, capacity: how many sequences fit, and how fast they decode,
when the KV cache moves off the model worker's device.

Every device here has the same memory, --device-memory-gib (M). The model's weights
take W of it. Three layouts, each flooded with more requests of one context length
than fit, so that the KV cache limits the batch:
  - colocated, one device: weights and KV on one device, KV = M - W (core 0);
  - colocated, the same total memory as the offloading layout: KV = (K + 1) M - W,
    one device's compute (core 0);
  - offload: the model worker's device holds the weights only (its KV is on the
    attention workers), K attention workers hold KV = K M, micro-batches in ping-pong
    (model worker on core 0, attention worker on core 1, one torch thread each).
Reported per layout: the concurrent sequences the KV admitted (measured: the running
batch once every admitted prompt is prefilled), the decode step time and the decode
tokens/s at that batch, and preemptions while timing. Lamina's 2.39x larger batch is
the offload row against the one-device row.

The model is llama-100m with 8,192 positions (made once in the model cache), so that
contexts reach 8k.

    python bench/offload_capacity.py                                  # contexts 1024, 4096, 8000
    python bench/offload_capacity.py --contexts 2048 --device-memory-gib 2 --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

from environment import environment, write_results  # noqa: E402
from long_context_model import POSITIONS, long_context_model  # noqa: E402
from pinning import pin, pin_actor  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="1024,4096,8000")
    p.add_argument("--device-memory-gib", type=float, default=1.0)
    p.add_argument("--attention-workers", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def weights_gib(model: Path) -> float:
    return sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**30


def run(model: Path, context: int, kv_gib: float, offload: Any, decode_steps: int) -> dict[str, Any]:
    import torch

    from workers import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model), dtype="float32", kv_cache_memory_gib=kv_gib,
                                    max_num_batched_tokens=8192, max_num_seqs=1024, attention_offload=offload))
    cores = os.sched_getaffinity(0)
    try:
        fits = engine.blocks.num_blocks * engine.blocks.block_size // context
        # Nobody finishes while the others prefill or while timed: no block comes free.
        params = SamplingParams(temperature=0, max_tokens=POSITIONS - context - 1, ignore_eos=True)
        vocab = engine.model_config.vocab_size
        for i in range(fits + 4):  # more than fit: the KV cache limits the batch
            engine.add_request(str(i), [(i * 7919 + t * 104729) % (vocab - 4) + 4 for t in range(context)], params)
        running = engine.scheduler.running
        while True:  # prefill on every core, unpinned, until no waiting prompt is admitted
            admitted = len(running)
            engine.step()
            if len(running) == admitted and all(s.num_uncomputed_tokens <= 1 for s in running):
                break
        batch, preempted = len(running), engine.scheduler.num_preemptions
        pin(os.getpid(), 0)
        torch.set_num_threads(1)
        if engine.offload is not None:
            for worker in engine.offload.workers:
                pin_actor(worker, 1)
        steps = []
        for _ in range(decode_steps):
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        return {"context": context, "kv_gib": kv_gib, "kv_blocks": engine.blocks.num_blocks, "batch": batch,
                "median_step_ms": statistics.median(steps) * 1000, "decode_tokens_per_s": batch * len(steps) / sum(steps),
                "preemptions_while_timed": engine.scheduler.num_preemptions - preempted}
    finally:
        engine.shutdown()
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))


def main() -> int:
    import ray

    args = parse_args()
    model = long_context_model()
    m, k, w = args.device_memory_gib, args.attention_workers, weights_gib(model)
    if m <= w:
        raise SystemExit(f"--device-memory-gib {m} does not hold the weights ({w:.2f} GiB)")
    layouts = [("colocated, one device", m - w, None),
               (f"colocated, {k + 1} devices' memory", (k + 1) * m - w, None),
               (f"offload, K={k}", k * m, {"workers": k, "micro_batches": 2, "cpus_per_worker": 1})]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    print(f"llama-100m ({POSITIONS} positions, float32, weights {w:.2f} GiB); every device {m:g} GiB; "
          f"{args.decode_steps} decode steps timed. Colocated on core 0; offload: model worker on core 0, "
          f"attention worker on core 1; one torch thread each")
    print(f"{'context':>8}{'layout':>30}{'KV GiB':>8}{'batch':>7}{'x one device':>14}{'step ms':>9}"
          f"{'decode tok/s':>14}{'preempted':>11}")
    rows = []
    try:
        for context in (int(c) for c in args.contexts.split(",")):
            base = None
            for name, kv_gib, offload in layouts:
                row = {"layout": name, **run(model, context, kv_gib, offload, args.decode_steps)}
                base = base or row
                row["batch_vs_one_device"] = row["batch"] / base["batch"]
                rows.append(row)
                print(f"{context:>8}{name:>30}{kv_gib:>8.2f}{row['batch']:>7}{row['batch_vs_one_device']:>14.2f}"
                      f"{row['median_step_ms']:>9.1f}{row['decode_tokens_per_s']:>14.1f}"
                      f"{row['preemptions_while_timed']:>11}")
    finally:
        ray.shutdown()
    write_results({"environment": environment(), "weights_gib": w, "device_memory_gib": m, "rows": rows},
                  "offload-capacity", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
