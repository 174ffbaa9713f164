"""`yard profile`: measure the real engine's step time over a grid of batches and fit
the simulator's step-time model (cluster/sim/step_time.py) to it.

The grid has prefill-only steps (k prompts of l tokens), decode-only steps (B
requests at context ctx) and mixed steps (decodes with one prompt chunk beside them),
so that every coefficient is determined. Each shape is measured `repeats` times and
its median kept. The engine runs in this process, on the device asked for; nothing
else should compete for the machine while it measures.

The KV transfer rate is measured as a copy out of one engine's blocks and into
another's, through a byte string, in this process: a bound on what a transport
between two workers reaches. Pass a cluster's own rate (bench/disagg.py reports KV
copy time per handoff) with transfer_bytes_per_s to replace it.
"""

from __future__ import annotations

import io
import itertools
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

from cluster.sim.step_time import COEFFICIENTS, BatchShape, StepTimeModel, batch_shape, fit

TRANSFER_BLOCKS = 64


@dataclass(frozen=True)
class ProfileGrid:
    prefill_lengths: tuple[int, ...] = (32, 128, 512)
    prefill_batch: tuple[int, ...] = (1, 2, 4)
    decode_batch: tuple[int, ...] = (1, 4, 16)
    decode_context: tuple[int, ...] = (64, 256, 1024)
    mixed: tuple[tuple[int, int, int], ...] = ((4, 256, 128), (8, 128, 256))  # (decodes, context, chunk)
    decode_steps: int = 4  # timed decode steps per (B, ctx): context grows by one each

    @property
    def budget(self) -> int:
        """Tokens of the largest batch: every batch fits one step, so each shape is what it says."""
        return max(max(self.prefill_lengths) * max(self.prefill_batch),
                   max(self.decode_batch) * max(self.decode_context),
                   *(b * ctx + chunk for b, ctx, chunk in self.mixed))


@dataclass(frozen=True)
class ProfileResult:
    model: StepTimeModel
    samples: list[tuple[BatchShape, float]]  # median seconds per shape

    def mean_relative_error(self) -> float:
        """How far the fitted model is from the medians it was fitted to."""
        return statistics.fmean(abs(self.model.step_s(s) - t) / t for s, t in self.samples)


def profile(model: str, device: str = "cpu", dtype: Optional[str] = None, block_size: int = 16,
            repeats: int = 3, transfer_bytes_per_s: Optional[float] = None, transfer_latency_s: float = 0.001,
            grid: ProfileGrid = ProfileGrid(), log: Callable[[str], None] = print) -> ProfileResult:
    import torch

    from workers import SamplingParams
    from workers.engine.config import EngineConfig
    from workers.engine.engine import LLMEngine
    from workers.engine.model_runner import kv_block_bytes

    blocks = 2 * grid.budget // block_size + 2 * TRANSFER_BLOCKS
    config = EngineConfig(model=model, device=device, dtype=dtype, block_size=block_size, num_kv_blocks=blocks,
                          max_num_batched_tokens=grid.budget, max_num_seqs=512, enable_prefix_caching=False)
    engine = LLMEngine(config)
    longest = engine.max_model_len - 1 - grid.decode_steps
    ids = itertools.count()
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    def add(n: int, max_tokens: int) -> str:
        rid = f"p{next(ids)}"
        engine.add_request(rid, prompt(n), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        return rid

    def timed_step() -> float:
        start = time.perf_counter()
        engine.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    measured: dict[BatchShape, list[float]] = {}

    def record(shape: BatchShape, seconds: float) -> None:
        measured.setdefault(shape, []).append(seconds)

    add(16, 2)  # warm up: the first steps pay for lazy initialization
    while engine.has_unfinished_requests():
        engine.step()
    for _ in range(repeats):
        for length in (n for n in grid.prefill_lengths if n <= longest):
            for k in grid.prefill_batch:
                for _ in range(k):
                    add(length, 1)
                record(batch_shape([(0, length)] * k), timed_step())
        for b in grid.decode_batch:
            for ctx in (c for c in grid.decode_context if c <= longest):
                rids = [add(ctx, grid.decode_steps + 1) for _ in range(b)]
                _decode_steps(engine, rids, ctx, grid.decode_steps, record, timed_step)
        for b, ctx, chunk in grid.mixed:
            if ctx <= longest and chunk <= longest:
                for _ in range(b):
                    add(ctx, grid.decode_steps + 1)
                engine.step()  # their prefill, in one step
                add(chunk, 1)
                record(batch_shape([(ctx, 1)] * b + [(0, chunk)]), timed_step())
                while engine.has_unfinished_requests():
                    engine.step()
    samples = [(shape, statistics.median(times)) for shape, times in measured.items()]
    coefficients = dict(zip(COEFFICIENTS, fit(samples)))
    block_bytes = kv_block_bytes(engine.model_config, block_size, engine.model_config.num_kv_heads)
    if transfer_bytes_per_s is None:
        transfer_bytes_per_s = _copy_rate(engine, block_bytes, repeats)
    log(f"{len(samples)} batch shapes, {sum(len(t) for t in measured.values())} steps timed; "
        f"KV copy {transfer_bytes_per_s / 1e6:.0f} MB/s")
    result = ProfileResult(StepTimeModel(**coefficients, model=model, device=device, block_size=block_size,
                                         kv_block_bytes=block_bytes,
                                         max_position_embeddings=engine.model_config.max_position_embeddings,
                                         transfer_bytes_per_s=transfer_bytes_per_s,
                                         transfer_latency_s=transfer_latency_s), samples)
    engine.shutdown()
    return result


def _decode_steps(engine, rids: list[str], ctx: int, steps: int, record: Callable[[BatchShape, float], None],
                  timed_step: Callable[[], float]) -> None:
    """Prefill the requests (untimed, in one step), then time their decode steps."""
    engine.step()
    if any(engine.requests[r].seq.num_computed_tokens != ctx for r in rids):
        raise RuntimeError(f"{len(rids)} prompts of {ctx} tokens did not prefill in one step")
    for j in range(steps):
        # Each decode computes the token sampled last: context ctx + j + 1.
        record(batch_shape([(ctx + j, 1)] * len(rids)), timed_step())
    while engine.has_unfinished_requests():
        engine.step()


def _copy_rate(engine, block_bytes: int, repeats: int) -> float:
    """Bytes per second out of blocks, through bytes, into other blocks."""
    import torch

    source = list(range(TRANSFER_BLOCKS))
    dest = list(range(TRANSFER_BLOCKS, 2 * TRANSFER_BLOCKS))
    times = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        buffer = io.BytesIO()
        torch.save(engine.read_kv(source), buffer)
        engine.write_kv(dest, torch.load(io.BytesIO(buffer.getvalue())))
        times.append(time.perf_counter() - start)
    return TRANSFER_BLOCKS * block_bytes / statistics.median(times)
