"""The placement table an expert-parallel instance starts with: contiguous (no
statistics yet), or one read from a file, such as a table `yard experts --json`
printed from another instance's traffic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from workers.experts.policies import PlacementShape, contiguous
from workers.experts.stats import RoutingStats
from workers.experts.table import PlacementTable


def initial_table(expert_parallel_size: int, placement: str, slots_per_rank: Optional[int], num_layers: int,
                  num_experts: int) -> Optional[PlacementTable]:
    """None without expert parallelism."""
    if expert_parallel_size == 1:
        return None
    if placement == "contiguous":
        if slots_per_rank is None:
            if num_experts % expert_parallel_size:
                raise ValueError(f"expert_parallel_size {expert_parallel_size} does not divide the model's "
                                 f"{num_experts} experts: set expert_slots_per_rank")
            slots_per_rank = num_experts // expert_parallel_size
        shape = PlacementShape(expert_parallel_size, slots_per_rank)
        return contiguous(RoutingStats.empty(num_layers, num_experts), shape)
    table = read_table(Path(placement))
    if slots_per_rank is not None and slots_per_rank != table.slots_per_rank:
        raise ValueError(f"expert_slots_per_rank is {slots_per_rank}, but the table in {placement} has "
                         f"{table.slots_per_rank} slots per rank")
    return table


def read_table(path: Path) -> PlacementTable:
    if not path.is_file():
        raise ValueError(f"expert_placement must be 'contiguous' or a placement table's JSON file; "
                         f"{str(path)!r} is neither")
    try:
        raw = json.loads(path.read_text())
        raw = raw.get("table", raw) if isinstance(raw, dict) and "slots" not in raw else raw
        return PlacementTable.from_dict(raw)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"expert_placement {str(path)!r} is not a placement table "
                         f"(num_experts, num_ranks, slots): {e!r}") from None
    except ValueError as e:
        raise ValueError(f"expert_placement {str(path)!r}: {e}") from None
