"""Where an expert-parallel forward's tokens sit and which slot serves each choice.

Residence: between attention and the experts, each token of the batch sits on one
rank. At layer 0 the batch is cut into equal runs; at layer l + 1 a token sits on the
rank that served its first choice at layer l (ExFlow's rule, workers/experts/traffic.py),
so a placement that keeps co-chosen experts together keeps the token where it is.

SlotChooser is PlacementTable.choose_slot for a whole batch at once, as tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from workers.experts.table import PlacementTable


class Residence:
    """Which rank each of the forward's T tokens sits on, and its row there."""

    def __init__(self, ranks: torch.Tensor, counts: list[int]) -> None:
        self.ranks, self.counts = ranks, counts  # [T]; tokens per rank
        self.block = max(counts)  # rows per rank where a collective wants equal blocks
        self.order = ranks.argsort(stable=True)  # the tokens rank by rank, in batch order
        self.starts = [sum(counts[:r]) for r in range(len(counts))]
        starts = torch.tensor(self.starts, dtype=torch.long, device=ranks.device)
        self.position = torch.empty_like(ranks)  # a token's row among its rank's tokens
        self.position[self.order] = torch.arange(ranks.shape[0], device=ranks.device) - starts[ranks[self.order]]
        self.rows = ranks * self.block + self.position  # its row in the padded blocks

    @classmethod
    def in_runs(cls, num_tokens: int, num_ranks: int, device: torch.device) -> "Residence":
        """Token t on rank floor(t * N / T)."""
        ranks = torch.arange(num_tokens, device=device) * num_ranks // num_tokens
        bounds = [-(-r * num_tokens // num_ranks) for r in range(num_ranks + 1)]
        return cls(ranks, [bounds[r + 1] - bounds[r] for r in range(num_ranks)])

    def tokens_of(self, rank: int) -> torch.Tensor:
        return self.order[self.starts[rank]:self.starts[rank] + self.counts[rank]]

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] → [N * block, ...]: rank r's tokens in block r, zero padding after."""
        out = x.new_zeros(len(self.counts) * self.block, *x.shape[1:])
        out[self.rows] = x
        return out

    def pad(self, own: torch.Tensor) -> torch.Tensor:
        """One rank's rows [count, ...] → [block, ...]."""
        out = own.new_zeros(self.block, *own.shape[1:])
        out[:own.shape[0]] = own
        return out

    def unspread(self, blocks: torch.Tensor) -> torch.Tensor:
        """[N * block, ...] (every rank's padded rows) → [T, ...] in batch order."""
        return blocks[self.rows]


@dataclass
class ForwardResidence:
    """Shared by a model's expert-parallel layers: each layer reads where the tokens
    sit and leaves where they will sit for the next."""

    num_ranks: int
    current: Optional[Residence] = field(default=None)

    def begin(self, num_tokens: int, device: torch.device) -> None:
        self.current = Residence.in_runs(num_tokens, self.num_ranks, device)


class SlotChooser:
    """One layer's table as tensors: a replica on the token's own rank when there is
    one, else the replicas in turn by batch position."""

    def __init__(self, table: PlacementTable, layer: int, device: Optional[torch.device] = None) -> None:
        n, replicas = table.slots_per_rank, table.replicas[layer]
        local = [[-1] * table.num_experts for _ in range(table.num_ranks)]
        for slot, expert in enumerate(table.slots[layer]):
            if local[slot // n][expert] < 0:
                local[slot // n][expert] = slot
        widest = max(len(s) for s in replicas)
        self.local = torch.tensor(local, dtype=torch.long, device=device)  # [rank, expert] → slot or -1
        self.replicas = torch.tensor([list(s) + [s[0]] * (widest - len(s)) for s in replicas], dtype=torch.long,
                                     device=device)  # [expert, i] → its i-th slot (padded)
        self.count = torch.tensor([len(s) for s in replicas], dtype=torch.long, device=device)

    def choose(self, experts: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """experts [T, k], ranks [T] (where each token sits) → slots [T, k]."""
        position = torch.arange(experts.shape[0], device=experts.device).unsqueeze(1)
        local = self.local[ranks.unsqueeze(1), experts]
        turn = self.replicas[experts, position % self.count[experts]]
        return torch.where(local >= 0, local, turn)
