"""What the leader of a tensor-parallel instance broadcasts to the other ranks, one
message per engine step. KV blocks for migration do not travel this way: each rank
reads and writes its own shard when a transport asks it (RankWorker.read_shard,
write_shard), so nothing is gathered on the leader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from workers.engine.model_runner import StepInputs


@dataclass(frozen=True, slots=True)
class RunStep:
    """Run the forward with these inputs, joining the all-reduces."""

    inputs: "StepInputs"
    forward_id: int  # the leader's, so that a KV reader names the same forward on every rank


@dataclass(frozen=True, slots=True)
class Stop:
    """Leave the command loop."""


@dataclass(frozen=True, slots=True)
class StageExperts:
    """Stage one layer of a new expert placement table (workers/models/expert_mover.py)."""

    table: dict  # PlacementTable.to_dict()
    layer: int


@dataclass(frozen=True, slots=True)
class SwapExperts:
    """Swap every staged layer in and adopt the table."""

    table: dict


ExpertCommand = Union[StageExperts, SwapExperts]
RankCommand = Union[RunStep, Stop, StageExperts, SwapExperts]
