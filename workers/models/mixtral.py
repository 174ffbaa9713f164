"""Mixtral: the Llama decoder with a sparse mixture-of-experts feed-forward.

Each token's router picks its top-k experts; their weights are a softmax over the
chosen experts' logits. Expert weights are stacked ([experts, ...]) so that a
placement table can later map logical experts to physical slots.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.config import ModelConfig
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = F.linear(x, self.gate_weight)
        # Softmax over all experts then renormalize over the top-k: the same as a
        # softmax over the chosen experts' logits, computed the reference's way.
        weights = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if self.recorder is not None:
            self.recorder.record(self.layer_index, experts)

        out = torch.zeros_like(x)
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=self.w13.shape[0]).tolist()
        token_of = order // self.top_k
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = order[start:start + count]
            tokens = token_of[start:start + count]
            start += count
            gate, up = F.linear(x[tokens], self.w13[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[expert])
            out.index_add_(0, tokens, y * weights.flatten()[rows].unsqueeze(-1))
        return self.tp.all_reduce(out)


class MixtralForCausalLM(LlamaForCausalLM):
    make_mlp = SparseMoE

    def __init__(self, cfg: ModelConfig, tp: Optional[TPGroup] = None) -> None:
        super().__init__(cfg, tp)
        # Every step's routing, counted on the device (workers/experts/ reads it).
        self.routing = RoutingRecorder(cfg.num_layers, cfg.num_experts)
        for i, layer in enumerate(self.layers):
            layer.mlp.layer_index = i
            layer.mlp.recorder = self.routing

    def load_mlp(self, loader: _Loader, mlp: nn.Module, prefix: str) -> None:
        moe = prefix + "block_sparse_moe."
        loader.copy(mlp.gate_weight, moe + "gate.weight")
        start, full = self.plan.intermediate_start, self.cfg.intermediate_size
        for e in range(mlp.w13.shape[0]):
            expert = f"{moe}experts.{e}."
            gate, up = mlp.w13[e].chunk(2)
            loader.copy(gate, expert + "w1.weight", 0, start, full)
            loader.copy(up, expert + "w3.weight", 0, start, full)
            loader.copy(mlp.w2[e], expert + "w2.weight", 1, start, full)
