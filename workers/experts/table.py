"""The placement table: per MoE layer, which logical expert each physical slot holds.

Slots are numbered rank-major: rank r holds slots [r * slots_per_rank, (r + 1) *
slots_per_rank). A hot expert may hold several slots (replicas, after DeepSeek's EPLB);
every expert holds at least one. A token picks among its expert's replicas by a
deterministic rule (choose_slot), so every rank agrees on where each token goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass(frozen=True)
class PlacementTable:
    num_experts: int
    num_ranks: int
    slots: tuple[tuple[int, ...], ...]  # [layer][slot] -> logical expert
    # [layer][expert] -> its slots, ascending; derived from `slots`
    replicas: tuple[tuple[tuple[int, ...], ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_positive("num_experts", self.num_experts)
        _check_positive("num_ranks", self.num_ranks)
        if not self.slots:
            raise ValueError("a placement table needs at least one layer, got none")
        replicas = []
        for layer, row in enumerate(self.slots):
            if len(row) != len(self.slots[0]):
                raise ValueError(f"layer {layer} has {len(row)} slots, layer 0 has {len(self.slots[0])}: "
                                 f"every layer has the same slots")
            replicas.append(self._replicas_of(layer, row))
        if len(self.slots[0]) % self.num_ranks:
            raise ValueError(f"expert_parallel_size {self.num_ranks} does not divide the {len(self.slots[0])} "
                             f"expert slots per layer")
        object.__setattr__(self, "replicas", tuple(replicas))

    def _replicas_of(self, layer: int, row: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        held: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(row):
            if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < self.num_experts:
                raise ValueError(f"layer {layer} slot {slot} names expert {expert!r}; the model has experts "
                                 f"0..{self.num_experts - 1}")
            held[expert].append(slot)
        missing = [e for e, s in enumerate(held) if not s]
        if missing:
            raise ValueError(f"layer {layer} places no slot for experts {missing}: every expert needs one")
        return tuple(tuple(s) for s in held)

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0]) // self.num_ranks

    def rank_of(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def experts_on(self, layer: int, rank: int) -> tuple[int, ...]:
        n = self.slots_per_rank
        return self.slots[layer][rank * n:(rank + 1) * n]

    def choose_slot(self, layer: int, expert: int, token: int, near_rank: Optional[int] = None) -> int:
        """The slot that serves `expert` for the token at batch position `token`: a
        replica on `near_rank` (where the token is) when there is one, else the
        replicas in turn by token position, which spreads a hot expert's tokens evenly."""
        slots = self.replicas[layer][expert]
        if near_rank is not None and len(slots) > 1:
            for s in slots:
                if self.rank_of(s) == near_rank:
                    return s
        return slots[token % len(slots)]

    def replica_counts(self, layer: int) -> list[int]:
        return [len(s) for s in self.replicas[layer]]

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "num_ranks": self.num_ranks, "slots": [list(r) for r in self.slots]}

    @classmethod
    def from_dict(cls, raw: dict) -> "PlacementTable":
        return cls(raw["num_experts"], raw["num_ranks"], tuple(tuple(r) for r in raw["slots"]))


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
