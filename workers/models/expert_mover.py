"""Live re-placement of an expert-parallel model's experts, on every rank.

A move goes layer by layer, one layer between two engine steps: each rank allocates
staging buffers for its new slots of the layer, then the ranks exchange the experts
that change rank in one all-to-all (an expert a rank already holds is copied
locally). The live weights are untouched until every layer is staged; then, between
two steps, every rank swaps its staged layers in and adopts the new table. Tokens in
flight are unaffected: each layer runs wholly on the old table or wholly on the new.

A rank that cannot stage (its buffers do not fit) says so in an all-reduce before any
weight moves, and every rank drops what it staged: the old table stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.experts.table import PlacementTable
from workers.models.expert_dispatch import SlotChooser
from workers.models.expert_parallel import ExpertShard
from workers.parallel.commands import ExpertCommand, StageExperts, SwapExperts
from workers.parallel.group import TPGroup


class StagingFailed(RuntimeError):
    """Some rank could not stage a layer; the move is dropped on every rank."""


@dataclass(frozen=True)
class Transfer:
    expert: int
    source_rank: int
    source_slot: int  # the source's local slot index (old table)
    dest_slot: int  # the destination's local slot index (new table)


class ExpertMover:
    def __init__(self, shards: list[ExpertShard], tp: TPGroup) -> None:
        self.shards, self.tp = shards, tp
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer → (w13, w2) of the new slots

    @property
    def table(self) -> PlacementTable:
        return self.shards[0].table

    def stage(self, new: PlacementTable, layer: int) -> None:
        """Collective: fill this rank's staging buffers for `layer` of `new`."""
        shard = self.shards[layer]
        try:
            buffers = self._allocate(shard)
            error = None
        except (MemoryError, RuntimeError) as e:
            buffers, error = None, e
        failures = self.tp.all_reduce(torch.tensor([0 if error is None else 1], dtype=torch.int64))
        if int(failures.item()):
            self.drop()
            raise StagingFailed(f"{int(failures.item())} rank(s) could not stage layer {layer}"
                                + (f"; this one: {error}" if error is not None else ""))
        self._exchange(shard, self.table, new, layer, buffers)
        self.staged[layer] = buffers

    def swap(self, new: PlacementTable) -> None:
        """Between two steps, on every rank: the staged layers go live with `new`."""
        for layer, shard in enumerate(self.shards):
            if layer in self.staged:
                shard.w13.data, shard.w2.data = self.staged[layer]
            shard.table = new
            shard.chooser = SlotChooser(new, layer, shard.w13.device)
        self.staged = {}

    def drop(self) -> None:
        self.staged = {}

    def _allocate(self, shard: ExpertShard) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty_like(shard.w13), torch.empty_like(shard.w2)

    def _exchange(self, shard: ExpertShard, old: PlacementTable, new: PlacementTable, layer: int,
                  buffers: tuple[torch.Tensor, torch.Tensor]) -> None:
        N, r = self.tp.size, self.tp.rank
        w13, w2 = buffers
        plans = [transfers_into(old, new, layer, d) for d in range(N)]
        for t in plans[r]:
            if t.source_rank == r:
                w13[t.dest_slot].copy_(shard.w13[t.source_slot])
                w2[t.dest_slot].copy_(shard.w2[t.source_slot])
        outgoing = [[t for t in plans[d] if t.source_rank == r] for d in range(N)]
        incoming = [t for t in plans[r] if t.source_rank != r]  # in rank order, as they arrive
        send_rows = [0 if d == r else len(outgoing[d]) for d in range(N)]
        rows = [torch.cat([shard.w13[t.source_slot].flatten(), shard.w2[t.source_slot].flatten()])
                for d in range(N) if d != r for t in outgoing[d]]
        width = w13[0].numel() + w2[0].numel()
        send = torch.stack(rows) if rows else w13.new_empty(0, width)
        recv_rows = [0 if s == r else sum(1 for t in incoming if t.source_rank == s) for s in range(N)]
        received = self.tp.all_to_all(send, send_rows, recv_rows)
        split = w13[0].numel()
        for t, row in zip(incoming, received):
            w13[t.dest_slot].copy_(row[:split].view_as(w13[t.dest_slot]))
            w2[t.dest_slot].copy_(row[split:].view_as(w2[t.dest_slot]))


def follow(model: torch.nn.Module, command: ExpertCommand) -> None:
    """A rank other than 0 runs the leader's expert command (StagingFailed is the
    leader's to report: every rank already dropped the move)."""
    mover: ExpertMover = model.mover
    if isinstance(command, StageExperts):
        try:
            mover.stage(PlacementTable.from_dict(command.table), command.layer)
        except StagingFailed:
            pass
    elif isinstance(command, SwapExperts):
        model.adopt_placement(PlacementTable.from_dict(command.table))


def transfers_into(old: PlacementTable, new: PlacementTable, layer: int, rank: int) -> list[Transfer]:
    """What `rank` needs for its slots of `layer` under `new`, sources ranked by: the
    rank itself, else the lowest rank that holds the expert under `old`. Ordered by
    source rank, then destination slot: the order an all-to-all delivers them."""
    n_old = old.slots_per_rank
    held = old.experts_on(layer, rank)
    transfers = []
    for dest_slot, expert in enumerate(new.experts_on(layer, rank)):
        if expert in held:
            transfers.append(Transfer(expert, rank, held.index(expert), dest_slot))
        else:
            slot = old.replicas[layer][expert][0]
            transfers.append(Transfer(expert, slot // n_old, slot % n_old, dest_slot))
    return sorted(transfers, key=lambda t: (t.source_rank, t.dest_slot))


def movable(old: PlacementTable, new: PlacementTable) -> None:
    """A ValueError naming what differs unless `new` can replace `old` in place."""
    if (new.num_layers, new.num_experts, new.num_ranks, new.slots_per_rank) != \
            (old.num_layers, old.num_experts, old.num_ranks, old.slots_per_rank):
        raise ValueError(f"a new placement table must keep {old.num_layers} layers, {old.num_experts} experts, "
                         f"{old.num_ranks} ranks and {old.slots_per_rank} slots per rank; got {new.num_layers}, "
                         f"{new.num_experts}, {new.num_ranks} and {new.slots_per_rank}")
