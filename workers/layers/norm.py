"""RMSNorm, alone and fused with the residual sum before it.

Normalized in float32 whatever the model dtype, as the reference does. In float32 on
CPU a compiled kernel does it in one pass per row (rms_norm.c); otherwise PyTorch.
"""

from __future__ import annotations

import torch

from workers.layers.cpu_kernels import load_rms_norm_kernels


def _kernel_takes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) \
        and tensors[0].dim() == 2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernels = load_rms_norm_kernels()
    if kernels is not None and _kernel_takes(x, weight):
        return kernels[0](x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): a decoder layer's residual sum and the norm
    that follows it."""
    kernels = load_rms_norm_kernels()
    if kernels is not None and _kernel_takes(x, delta, weight) and x.shape == delta.shape:
        return kernels[1](x, delta, weight, eps)
    total = x + delta
    return total, rms_norm(total, weight, eps)
