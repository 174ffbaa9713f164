"""Counts a MoE model's routing as it runs: per layer, tokens per expert, and
transitions from a token's first choice at layer l to each of its choices at l + 1
(workers/experts/stats.py's definitions).

The counts accumulate in tensors on the model's device, two bincounts per layer, with
no host sync; take() hands them over as plain RoutingStats once per step.
"""

from __future__ import annotations

from typing import Optional

import torch

from workers.experts.stats import RoutingStats


class RoutingRecorder:
    def __init__(self, num_layers: int, num_experts: int, device: Optional[torch.device] = None) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.loads = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self.moves = torch.zeros(max(num_layers - 1, 0), num_experts * num_experts, dtype=torch.int64, device=device)
        self._first: Optional[torch.Tensor] = None  # the previous layer's first choices, this forward
        # With keep_choices: every forward's choices, [forward][layer] -> [token][k], for
        # routing traces (a host sync per layer: benchmarks only).
        self.choices: Optional[list[list[list[list[int]]]]] = None

    def keep_choices(self) -> None:
        self.choices = []

    def record(self, layer: int, experts: torch.Tensor) -> None:
        """One layer's choices: experts[token] = its top-k, first choice first. Layers
        of a forward come in order; layer 0 starts a new forward."""
        E = self.num_experts
        self.loads[layer] += torch.bincount(experts.flatten(), minlength=E)
        if self.choices is not None:
            if layer == 0:
                self.choices.append([])
            self.choices[-1].append(experts.tolist())
        if layer > 0 and self._first is not None and self._first.shape[0] == experts.shape[0]:
            pairs = self._first.unsqueeze(-1) * E + experts
            self.moves[layer - 1] += torch.bincount(pairs.flatten(), minlength=E * E)
        self._first = experts[:, 0]

    def take(self) -> RoutingStats:
        """The counts since the last take(), and a fresh start."""
        loads, moves = self.loads.tolist(), self.moves.view(-1, self.num_experts, self.num_experts).tolist()
        self.loads.zero_()
        self.moves.zero_()
        self._first = None
        return RoutingStats(tuple(tuple(r) for r in loads), tuple(tuple(tuple(r) for r in m) for m in moves))
