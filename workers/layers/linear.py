"""A linear layer that, on CPU in bfloat16, runs on a weight pre-packed for oneDNN.

The plain weight stays the parameter that checkpoints load into (and that tensor
parallelism slices); `pack()` then lays it out once in oneDNN's blocked format, so
bfloat16 matmuls do not reorder the weight on every call. Float32 stays with F.linear
(MKL's sgemm): on torch 2.13 it is as fast as the packed matmul at every batch size,
and the packed one builds a new oneDNN kernel for every row count it has not seen,
7 to 18 ms per step whose batch size is new, which in serving is most steps
(docs/performance.md, *Fixed*). On other devices, or where oneDNN is missing, it is
F.linear.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_BATCH_HINT = 64  # oneDNN picks its blocking for about this many rows


def _packable(dtype: torch.dtype) -> bool:
    """bfloat16, where the CPU has the instructions for it (AVX512-BF16 or
    AVX-NE-CONVERT): elsewhere packing raises."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        # `weight` lets a layer share another's parameter (a tied LM head).
        self.weight = weight if weight is not None else nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed: Optional[torch.Tensor] = None

    def pack(self) -> None:
        """Call after the weights are loaded; a later load must call it again."""
        w = self.weight
        if w.device.type == "cpu" and _packable(w.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
