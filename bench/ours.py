"""yard's own engine on the benchmark's workload, through the offline API.

`workers.LLM` is the same engine a worker actor runs, minus Ray. Its stats say how
long steps took and how much of that was the model forward; the rest (scheduling,
block tables, input preparation, sampling, detokenizing, bookkeeping) is overhead
the engine itself adds.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import Any, Optional


def run_ours(model_dir: Path, prompts: list[list[int]], output_len: int,
             warmup_prompts: int = 4, engine_kwargs: Optional[dict[str, Any]] = None
             ) -> dict[str, Any]:
    from workers import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", **(engine_kwargs or {}))
    load_s = time.perf_counter() - t0

    def sampling(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    warmup_s = 0.0
    if warmup_prompts > 0:
        start = time.perf_counter()
        llm.generate(prompts[:warmup_prompts], sampling(min(16, output_len)))
        warmup_s = time.perf_counter() - start
    before = llm.engine.stats()

    start, cpu_start = time.perf_counter(), _process_cpu_s()
    outs = llm.generate(prompts, sampling(output_len))
    wall_s = time.perf_counter() - start
    cpu_s = _process_cpu_s() - cpu_start

    after = llm.engine.stats()
    token_ids = [list(o.token_ids) for o in outs]
    del llm, outs
    gc.collect()
    # Differenced against the snapshot after warm-up: the share covers the timed run.
    step_s = after.total_step_time_s - before.total_step_time_s
    model_s = after.total_model_time_s - before.total_model_time_s
    steps = after.num_steps - before.num_steps
    extra = {
        "engine_stats": dataclasses.asdict(after),
        "overhead": {"share": 1.0 - model_s / step_s if step_s else 0.0,
                     "source": "1 - model time / step time over the timed run"},
        "steps": steps,
        "wall_per_step_s": wall_s / steps if steps else None,
        # This process's CPU over the timed run: the cores the engine kept busy
        # (torch's waiting threads spin a while, and count).
        "cpu_s": cpu_s,
        "cpu_cores": cpu_s / wall_s if wall_s else None,
    }
    return {"wall_s": wall_s, "load_s": load_s, "warmup_s": warmup_s,
            "token_ids": token_ids, "extra": extra}


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system
