"""What a placement costs: tokens per rank (balance) and tokens that cross ranks
between layers (traffic).

The traffic model is ExFlow's: after a layer, a token sits on the rank that computed
its first-choice expert; at the next layer, each of its chosen experts that has no
replica on that rank costs one cross-rank token. A token picks a replica on its own
rank when its expert has one (PlacementTable.choose_slot). At layer 0 tokens start on
their home rank, spread evenly, so only layers 1.. are counted.
"""

from __future__ import annotations

from typing import Sequence

from workers.experts.stats import Routing, RoutingStats
from workers.experts.table import PlacementTable


def rank_loads(table: PlacementTable, loads: Sequence[Sequence[float]]) -> list[list[float]]:
    """[layer][rank] -> tokens, an expert's tokens split evenly over its replicas."""
    out = []
    for layer, row in enumerate(table.slots):
        counts = table.replica_counts(layer)
        per_rank = [0.0] * table.num_ranks
        for slot, expert in enumerate(row):
            per_rank[table.rank_of(slot)] += loads[layer][expert] / counts[expert]
        out.append(per_rank)
    return out


def balancedness(table: PlacementTable, loads: Sequence[Sequence[float]]) -> list[float]:
    """Per layer, mean over max tokens per rank: 1.0 is perfect balance."""
    return [sum(r) / len(r) / max(r) if max(r) > 0 else 1.0 for r in rank_loads(table, loads)]


def cross_rank_tokens(table: PlacementTable, routing: Routing) -> list[int]:
    """Per layer 1.., the tokens that cross ranks, for a routing known token by token."""
    out = []
    home = [t % table.num_ranks for t in range(len(routing[0]))]
    for layer, tokens in enumerate(routing):
        crossed = 0
        nxt = []
        for t, chosen in enumerate(tokens):
            ranks = [table.rank_of(table.choose_slot(layer, e, t, near_rank=home[t])) for e in chosen]
            crossed += sum(r != home[t] for r in ranks)
            nxt.append(ranks[0])
        if layer:
            out.append(crossed)
        home = nxt
    return out


def expected_cross_rank_tokens(table: PlacementTable, stats: RoutingStats) -> list[float]:
    """Per layer 1.., cross-rank tokens expected from aggregate statistics: a first
    choice's tokens sit on its replicas' ranks in equal shares."""
    out = []
    for layer, moves in enumerate(stats.transitions):
        ranks_of = [{table.rank_of(s) for s in slots} for slots in table.replicas[layer + 1]]
        crossed = 0.0
        for i, row in enumerate(moves):
            sources = table.replicas[layer][i]
            for j, count in enumerate(row):
                if count:
                    away = sum(table.rank_of(s) not in ranks_of[j] for s in sources)
                    crossed += count * away / len(sources)
        out.append(crossed)
    return out
