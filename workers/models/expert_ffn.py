"""A MoE layer's two computations: the router's choice of experts per token, and
every expert's SwiGLU feed-forward over its own rows, in two grouped matmuls.

The rows arrive sorted by expert; `ends[e]` is one past expert e's last row, a tensor
that stays on the device, so nothing waits for the host. torch's grouped_mm wants
row strides that are multiples of 16 bytes; for shapes or dtypes it refuses, the
experts run one by one (that path reads the row counts on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ExpertFFN:
    def __init__(self) -> None:
        self.grouped = True  # until grouped_mm refuses these shapes once

    def __call__(self, rows: torch.Tensor, ends: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """rows [m, hidden] sorted by expert; w13 [experts, 2 * inter, hidden]; w2
        [experts, hidden, inter] → [m, hidden], row for row."""
        if rows.shape[0] == 0:
            return rows.clone()
        if self.grouped:
            try:
                return _grouped(rows, ends, w13, w2)
            except RuntimeError:
                self.grouped = False
        return _one_by_one(rows, ends, w13, w2)


def _grouped(rows: torch.Tensor, ends: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    offsets = ends.to(torch.int32)
    gate, up = F.grouped_mm(rows, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    return F.grouped_mm(F.silu(gate).mul_(up), w2.transpose(1, 2), offs=offsets)


def _one_by_one(rows: torch.Tensor, ends: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(rows)
    start = 0
    for expert, end in enumerate(ends.tolist()):
        if end > start:
            gate, up = F.linear(rows[start:end], w13[expert]).chunk(2, dim=-1)
            out[start:end] = F.linear(F.silu(gate).mul_(up), w2[expert])
        start = end
    return out


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-k experts [tokens, k], first choice first, and their weights."""
    # Softmax over all experts then renormalize over the top-k: the same as a
    # softmax over the chosen experts' logits, computed the reference's way.
    weights = F.softmax(F.linear(x, gate_weight), dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(weights, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), experts
