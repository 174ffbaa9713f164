"""The expert-parallel forward's bookkeeping: SlotChooser picks exactly the slots
PlacementTable.choose_slot names, and Residence's padded blocks put every token back
where it was."""

from __future__ import annotations

import random

import torch

from workers.experts.table import PlacementTable
from workers.models.expert_dispatch import Residence, SlotChooser


def random_table(rng: random.Random, num_experts: int, num_ranks: int, slots_per_rank: int) -> PlacementTable:
    rows = []
    for _ in range(3):
        row = list(range(num_experts)) + [rng.randrange(num_experts) for _ in range(num_ranks * slots_per_rank
                                                                                       - num_experts)]
        rng.shuffle(row)
        rows.append(tuple(row))
    return PlacementTable(num_experts, num_ranks, tuple(rows))


def test_slot_chooser_picks_the_tables_slot_for_every_token():
    rng = random.Random(0)
    for num_ranks, slots_per_rank in ((2, 10), (4, 5), (4, 4), (3, 7)):
        table = random_table(rng, 16, num_ranks, slots_per_rank)
        for layer in range(table.num_layers):
            chooser = SlotChooser(table, layer)
            experts = torch.tensor([rng.sample(range(16), 2) for _ in range(200)])
            ranks = torch.tensor([rng.randrange(num_ranks) for _ in range(200)])
            got = chooser.choose(experts, ranks).tolist()
            want = [[table.choose_slot(layer, e, t, near_rank=int(ranks[t])) for e in experts[t].tolist()]
                    for t in range(200)]
            assert got == want


def test_residence_blocks_round_trip_every_token():
    rng = random.Random(1)
    for _ in range(20):
        num_ranks, T = rng.randrange(1, 5), rng.randrange(1, 40)
        ranks = torch.tensor([rng.randrange(num_ranks) for _ in range(T)])
        where = Residence(ranks, torch.bincount(ranks, minlength=num_ranks).tolist())
        x = torch.randn(T, 3)
        blocks = where.spread(x)
        assert blocks.shape == (num_ranks * where.block, 3)
        # Each rank's block holds its tokens in batch order, then zeros.
        for r in range(num_ranks):
            mine = where.tokens_of(r)
            assert mine.tolist() == [t for t in range(T) if ranks[t] == r]
            block = blocks[r * where.block:(r + 1) * where.block]
            assert torch.equal(block[:len(mine)], x[mine])
            assert not block[len(mine):].any()
            assert where.position[mine].tolist() == list(range(len(mine)))
            assert torch.equal(where.pad(x[mine]), block)
        assert torch.equal(where.unspread(blocks), x)


def test_layer_zero_cuts_the_batch_into_equal_runs():
    for T, N in ((1, 4), (7, 2), (10, 4), (16, 4), (3, 3)):
        where = Residence.in_runs(T, N, torch.device("cpu"))
        assert where.counts == torch.bincount(where.ranks, minlength=N).tolist()
        assert max(where.counts) - min(where.counts) <= 1
        assert where.ranks.tolist() == sorted(where.ranks.tolist())
