"""Expert parallelism for Mixtral-style models, on the tensor-parallel group's ranks.

EP together with TP, on the same N ranks:
- attention, the embeddings and the LM head stay split by heads and vocabulary;
- each rank holds whole experts: its own slots of the placement table;
- around the experts the tokens are split across the ranks (sequence parallelism).
  The heads' partial outputs are reduce-scattered, so a rank holds only the tokens
  that sit on it (expert_dispatch.Residence). It routes them, sends each (token,
  choice) pair to the rank of the slot that serves it (all-to-all), runs its experts
  over what it received (grouped matmuls), sends the results back (all-to-all) and
  sums each token's choices. An all-gather rebuilds the batch for the next attention.

Every rank learns the whole batch's choices (an all-gather of k ints per token), so
each computes the same dispatch plan without exchanging counts, and the routing
recorder counts every token. The split sizes of the all-to-all are read on the host
once per layer (one bincount, together with the next layer's residence).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from workers.experts.table import PlacementTable
from workers.layers.attention import AttentionBatch
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import ModelConfig
from workers.models.expert_dispatch import ForwardResidence, Residence, SlotChooser
from workers.models.expert_ffn import ExpertFFN, route
from workers.models.llama import DecoderLayer, _param
from workers.models.routing_recorder import RoutingRecorder
from workers.parallel.group import TPGroup
from workers.parallel.shards import ShardPlan


class DispatchCounts:
    """Per layer, (token, choice) pairs sent from each rank to each rank since the
    last take(): cross-rank traffic and each rank's expert load."""

    def __init__(self, num_layers: int, num_ranks: int) -> None:
        self.num_layers, self.num_ranks = num_layers, num_ranks
        self.moved = self._zero()

    def _zero(self) -> list[list[list[int]]]:
        return [[[0] * self.num_ranks for _ in range(self.num_ranks)] for _ in range(self.num_layers)]

    def add(self, layer: int, moved: list[list[int]]) -> None:
        into = self.moved[layer]
        for s, row in enumerate(moved):
            for d, count in enumerate(row):
                into[s][d] += count

    def take(self) -> list[list[list[int]]]:
        """[layer][from rank][to rank] → pairs, and a fresh start."""
        moved, self.moved = self.moved, self._zero()
        return moved


class ExpertShard(nn.Module):
    """One MoE layer's router (replicated) and this rank's slots of it."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, table: PlacementTable, layer: int,
                 residence: ForwardResidence, counts: DispatchCounts) -> None:
        super().__init__()
        self.tp, self.top_k = tp, cfg.num_experts_per_token
        self.n = table.slots_per_rank
        self.gate_weight = _param(cfg.num_experts, cfg.hidden_size, dtype=cfg.dtype)
        self.w13 = _param(self.n, 2 * cfg.intermediate_size, cfg.hidden_size, dtype=cfg.dtype)
        self.w2 = _param(self.n, cfg.hidden_size, cfg.intermediate_size, dtype=cfg.dtype)
        self.layer_index = layer
        self.table = table
        self.chooser = SlotChooser(table, layer, self.gate_weight.device)
        self.residence, self.counts = residence, counts
        self.recorder: Optional[RoutingRecorder] = None
        self.ffn = ExpertFFN()

    def forward(self, x_own: torch.Tensor, where: Residence) -> torch.Tensor:
        """x_own: the normed rows of the tokens on this rank → their experts' weighted sum."""
        tp, N, r, n, k = self.tp, self.tp.size, self.tp.rank, self.n, self.top_k
        weights, experts = route(x_own, self.gate_weight, k)
        chosen = where.unspread(tp.all_gather(where.pad(experts)))  # [T, k]: every token's
        if self.recorder is not None:
            self.recorder.record(self.layer_index, chosen)
        slots = self.chooser.choose(chosen, where.ranks)
        S = N * n
        keys = (where.ranks.unsqueeze(1) * S + slots).flatten()
        order = keys.argsort(stable=True)  # pairs by residence, then slot
        first_rank = slots[:, 0] // n
        counts = torch.cat([torch.bincount(keys, minlength=N * S), torch.bincount(first_rank, minlength=N)]).tolist()
        moved = [[sum(counts[s * S + d * n:s * S + (d + 1) * n]) for d in range(N)] for s in range(N)]
        self.counts.add(self.layer_index, moved)
        self.residence.current = Residence(first_rank, counts[N * S:])

        lo = sum(sum(row) for row in moved[:r])
        sent = order[lo:lo + sum(moved[r])]  # this rank's pairs, by slot: rank 0's slots first
        own_rows = where.position[sent // k]
        incoming = [moved[s][r] for s in range(N)]
        received = tp.all_to_all(x_own[own_rows], moved[r], incoming)
        # What arrives: the pairs, in `order`, that a slot of this rank serves.
        sorted_slots = slots.flatten()[order]
        local = sorted_slots[sorted_slots // n == r] - r * n
        by_slot = local.argsort(stable=True)
        ends = torch.bincount(local, minlength=n).cumsum(0)
        y = torch.empty_like(received)
        y[by_slot] = self.ffn(received[by_slot], ends, self.w13, self.w2)
        back = tp.all_to_all(y, incoming, moved[r])
        out = torch.zeros_like(x_own)
        out.index_add_(0, own_rows, back * weights[own_rows, sent % k].unsqueeze(-1))
        return out


class ExpertParallelLayer(DecoderLayer):
    """A decoder layer whose MoE runs expert-parallel (the module docstring)."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, plan: ShardPlan, mlp: ExpertShard) -> None:
        super().__init__(cfg, tp, plan, lambda *_: mlp)
        self.tp = tp

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                kv_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        where = self.mlp.residence.current
        heads = self.self_attn.partial(self.input_layernorm(x), positions, rotary, kv_cache, batch)
        mine = where.tokens_of(self.tp.rank)
        x_own = x[mine] + self.tp.reduce_scatter(where.spread(heads))[:mine.shape[0]]
        y_own = x_own + self.mlp(self.post_attention_layernorm(x_own), where)
        return where.unspread(self.tp.all_gather(where.pad(y_own)))
