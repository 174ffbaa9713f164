"""How long an engine step takes, from its batch: the simulator's only model of the
hardware. `yard profile` measures the real engine and fits it (cluster/sim/profile.py).

A step runs prefill chunks and decodes together (chunked prefill). Its time is

    base + prefill_token·Σl + prefill_attention·Σ(l·p + l(l+1)/2)
         + decode_seq·B + decode_context·Σctx

over its prefill chunks (l tokens each, after p tokens already computed: the second
sum counts query-key pairs, Σl² for whole prompts) and its B decodes (ctx tokens of
context each), as DistServe and Vidur model prefill and decode. One intercept for
both: a step pays its fixed cost (scheduling, launch, sampling) once.

The file also holds what the simulator needs of the model and the machine: the bytes
of one KV block, the longest sequence, and the KV transfer rate that times
migrations and prefill-to-decode handoffs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

COEFFICIENTS = ("base_s", "prefill_token_s", "prefill_attention_s", "decode_seq_s", "decode_context_s")


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What a step computes, in the terms the model prices."""

    prefill_tokens: int = 0  # Σl
    prefill_attention: int = 0  # Σ(l·p + l(l+1)/2): query-key pairs of the prefill chunks
    decode_seqs: int = 0  # B
    decode_context: int = 0  # Σctx

    def features(self) -> tuple[float, ...]:
        return (1.0, self.prefill_tokens, self.prefill_attention, self.decode_seqs, self.decode_context)


def batch_shape(chunks: Iterable[tuple[int, int]]) -> BatchShape:
    """From (tokens computed before, tokens this step) per request. A one-token chunk
    is a decode, whatever produced it: the model runner batches those together."""
    pt = pa = ds = dc = 0
    for before, n in chunks:
        if n == 1:
            ds += 1
            dc += before + 1
        else:
            pt += n
            pa += n * before + n * (n + 1) // 2
    return BatchShape(pt, pa, ds, dc)


@dataclass(frozen=True)
class StepTimeModel:
    base_s: float
    prefill_token_s: float
    prefill_attention_s: float
    decode_seq_s: float
    decode_context_s: float
    # What it was measured on and for.
    model: str = ""
    device: str = "cpu"
    block_size: int = 16
    kv_block_bytes: int = 0  # one block, all layers, K and V, on one worker
    max_position_embeddings: int = 0
    transfer_bytes_per_s: float = 1e9  # KV copied between two workers
    transfer_latency_s: float = 0.001  # fixed cost of one copy (a round trip)

    def __post_init__(self) -> None:
        for name in COEFFICIENTS + ("transfer_latency_s",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"step-time model: {name} must be a finite number, got {value!r}")
        for name in ("block_size", "kv_block_bytes", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"step-time model: {name} must be an integer >= 1, got {value!r}")
        if not self.transfer_bytes_per_s > 0:
            raise ValueError(f"step-time model: transfer_bytes_per_s must be > 0, got {self.transfer_bytes_per_s!r}")
        if self.transfer_latency_s < 0:
            raise ValueError(f"step-time model: transfer_latency_s must be >= 0, got {self.transfer_latency_s!r}")

    def step_s(self, shape: BatchShape) -> float:
        """Seconds for one step; never below the intercept (a fit may give a feature a
        slightly negative weight)."""
        # Written out: the simulator prices every step it runs.
        return max(self.base_s, self.base_s + self.prefill_token_s * shape.prefill_tokens
                   + self.prefill_attention_s * shape.prefill_attention + self.decode_seq_s * shape.decode_seqs
                   + self.decode_context_s * shape.decode_context)

    def decode_steps_s(self, batch: int, context: int, steps: int) -> list[float]:
        """step_s of `steps` decode steps of `batch` requests, the first over `context`
        tokens of context, each next one over `batch` more: the same floats as step_s
        (its prefill terms are exact zeros), for a decode run's steps at once."""
        base, per_context = self.base_s, self.decode_context_s
        fixed = base + self.decode_seq_s * batch
        return [max(base, fixed + per_context * (context + j * batch)) for j in range(steps)]

    def transfer_s(self, num_blocks: int) -> float:
        """Seconds to copy num_blocks KV blocks to another worker in one call."""
        return self.transfer_latency_s + num_blocks * self.kv_block_bytes / self.transfer_bytes_per_s

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "StepTimeModel":
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a step-time model (JSON: {e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a step-time model is a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(raw) - known), sorted(set(COEFFICIENTS) - set(raw))
        if unknown or missing:
            raise ValueError(f"{path}: unknown fields {unknown}, missing {missing}; known: {sorted(known)}")
        return cls(**raw)


def fit(samples: Sequence[tuple[BatchShape, float]]) -> tuple[float, ...]:
    """Least-squares coefficients (COEFFICIENTS' order) from measured (shape, seconds).
    Needs prefill-only, decode-only and varied samples, else a term is unidentifiable."""
    import numpy as np  # only the fit needs it; the simulator's loop does not

    if len(samples) < len(COEFFICIENTS):
        raise ValueError(f"fitting {len(COEFFICIENTS)} coefficients needs at least as many samples, "
                         f"got {len(samples)}")
    x = np.array([shape.features() for shape, _ in samples], dtype=float)
    y = np.array([seconds for _, seconds in samples], dtype=float)
    # Scale each column to unit size: the features span ten orders of magnitude.
    scale = np.abs(x).max(axis=0)
    if not scale.all():
        absent = [COEFFICIENTS[i] for i in np.flatnonzero(scale == 0)]
        raise ValueError(f"the samples never exercise {absent}: add batches that do")
    solution, _, rank, _ = np.linalg.lstsq(x / scale, y, rcond=None)
    if rank < len(COEFFICIENTS):
        raise ValueError(f"the samples determine only {rank} of {len(COEFFICIENTS)} coefficients: "
                         f"vary prompt lengths, batch sizes and contexts independently")
    return tuple(float(c) for c in solution / scale)
