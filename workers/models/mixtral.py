"""Mixtral: the Llama decoder with a sparse mixture-of-experts feed-forward.

Each token's router picks its top-k experts; their weights are a softmax over the
chosen experts' logits. Expert weights are stacked ([experts, ...]) so that a
placement table can later map logical experts to physical slots.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from workers.models.config import ModelConfig
from workers.experts.table import PlacementTable
from workers.models.expert_dispatch import ForwardResidence
from workers.models.expert_ffn import ExpertFFN, route
from workers.models.expert_mover import ExpertMover
from workers.models.expert_parallel import DispatchCounts, ExpertParallelLayer, ExpertShard
from workers.models.llama import LlamaForCausalLM, _Loader, _param
from workers.models.routing_recorder import RoutingRecorder
from workers.parallel.group import TPGroup
from workers.parallel.shards import ShardPlan


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, plan: ShardPlan) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = cfg.num_experts_per_token
        # The router is replicated; every expert's FFN is split on its intermediate dim.
        self.gate_weight = _param(cfg.num_experts, cfg.hidden_size, dtype=cfg.dtype)
        self.w13 = _param(cfg.num_experts, 2 * plan.intermediate, cfg.hidden_size, dtype=cfg.dtype)
        self.w2 = _param(cfg.num_experts, cfg.hidden_size, plan.intermediate, dtype=cfg.dtype)
        self.layer_index = 0  # set by the model, for the routing recorder
        self.recorder: Optional[RoutingRecorder] = None
        self.ffn = ExpertFFN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(x, self.gate_weight, self.top_k)
        if self.recorder is not None:
            self.recorder.record(self.layer_index, experts)
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
        ends = torch.bincount(flat, minlength=self.w13.shape[0]).cumsum(0)
        tokens = order // self.top_k
        y = self.ffn(x[tokens], ends, self.w13, self.w2)
        out = torch.zeros_like(x)
        out.index_add_(0, tokens, y * weights.flatten()[order].unsqueeze(-1))
        return self.tp.all_reduce(out)


class MixtralForCausalLM(LlamaForCausalLM):
    """With a placement table, the experts run expert-parallel over the tensor-parallel
    group (expert_parallel.py); without one, every rank holds every expert, split on
    its intermediate dim."""

    make_mlp = SparseMoE

    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None,
                 placement: Optional[PlacementTable] = None) -> None:
        tp = tp or TPGroup()
        if placement is not None:
            check_placement(placement, cfg, tp.size)
            self.residence = ForwardResidence(tp.size)
            self.dispatch_counts = DispatchCounts(cfg.num_layers, tp.size)
        self.placement = placement
        super().__init__(cfg, tp)
        # Every step's routing, counted on the device (workers/experts/ reads it).
        self.routing = RoutingRecorder(cfg.num_layers, cfg.num_experts)
        for i, layer in enumerate(self.layers):
            layer.mlp.layer_index = i
            layer.mlp.recorder = self.routing
        self.mover = ExpertMover([layer.mlp for layer in self.layers], self.tp) if placement is not None else None

    def adopt_placement(self, table: PlacementTable) -> None:
        """Swap the staged experts in (expert_mover.py), between two steps."""
        self.mover.swap(table)
        self.placement = table

    def make_layer(self, index: int) -> nn.Module:
        if self.placement is None:
            return super().make_layer(index)
        shard = ExpertShard(self.cfg, self.tp, self.placement, index, self.residence, self.dispatch_counts)
        return ExpertParallelLayer(self.cfg, self.tp, self.plan, shard)

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.placement is not None:
            self.residence.begin(input_ids.shape[0], input_ids.device)
        return super().forward(input_ids, *args, **kwargs)

    def load_mlp(self, loader: _Loader, mlp: nn.Module, prefix: str) -> None:
        moe = prefix + "block_sparse_moe."
        loader.copy(mlp.gate_weight, moe + "gate.weight")
        if self.placement is not None:
            for i, e in enumerate(self.placement.experts_on(mlp.layer_index, self.tp.rank)):
                load_expert(loader, f"{moe}experts.{e}.", mlp.w13[i], mlp.w2[i])
            return
        start, full = self.plan.intermediate_start, self.cfg.intermediate_size
        for e in range(mlp.w13.shape[0]):
            load_expert(loader, f"{moe}experts.{e}.", mlp.w13[e], mlp.w2[e], start, full)


def load_expert(loader: _Loader, name: str, w13: torch.Tensor, w2: torch.Tensor, start: int = 0,
                full: Optional[int] = None) -> None:
    """One expert's weights, or the slice [start, start + rows) of its intermediate dim.
    Hub Mixtral names: w1 = gate, w3 = up, w2 = down."""
    full = full or w2.shape[1]
    gate, up = w13.chunk(2)
    loader.copy(gate, name + "w1.weight", 0, start, full)
    loader.copy(up, name + "w3.weight", 0, start, full)
    loader.copy(w2, name + "w2.weight", 1, start, full)


def check_placement(table: PlacementTable, cfg: ModelConfig, num_ranks: int) -> None:
    """A table that fits this model and this many ranks, or a ValueError naming what does not."""
    if (table.num_layers, table.num_experts) != (cfg.num_layers, cfg.num_experts):
        raise ValueError(f"expert placement table has {table.num_layers} layers of {table.num_experts} experts; "
                         f"the model has {cfg.num_layers} layers of {cfg.num_experts}")
    if table.num_ranks != num_ranks:
        raise ValueError(f"expert placement table is for {table.num_ranks} ranks; expert_parallel_size is "
                         f"{num_ranks}")
