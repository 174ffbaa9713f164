"""What the model worker broadcasts to its attention workers, once per step. The
per-layer tensors do not travel this way: they go point to point (link.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from workers.layers.attention import AttentionBatch


@dataclass(frozen=True, slots=True)
class AttendStep:
    """A forward begins: per micro-batch, where its tokens go in the cache and what
    each attends to (no process-local kernel, no mask: the attention worker makes its
    own). Layers come in order, and within a layer the micro-batches in order."""

    batches: list[AttentionBatch]


@dataclass(frozen=True, slots=True)
class StopAttending:
    """Leave the loop."""


AttentionCommand = Union[AttendStep, StopAttending]
