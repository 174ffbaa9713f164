"""Rotary position embedding (RoPE), in the rotate-half layout Llama checkpoints use.

q and k are rotated in place: they are column ranges of the fused qkv projection's
fresh output. In float32 on CPU a compiled kernel does it (rotary.c, the same bits as
the PyTorch path, at a tenth of its time); otherwise PyTorch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from workers.layers.cpu_kernels import load_rotary_kernel
from workers.models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """Per-pair rotation frequencies, float32, as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_frequencies(inv_freq, scaling)


def _llama3_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the
    # band between is interpolated smoothly.
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE to q and k given absolute positions; cos/sin are cached up front."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: Optional[RopeScaling], dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos().to(dtype), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype), persistent=False)
        self.kernel = load_rotary_kernel() if dtype == torch.float32 else None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotates q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place."""
        if self.kernel is not None and _kernel_takes(q, k, positions, self.cos):
            self.kernel(q, k, positions, self.cos, self.sin)
            return
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        q.copy_(_rotate(q, cos, sin))
        k.copy_(_rotate(k, cos, sin))


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor) -> bool:
    """The kernel's layout: float32 CPU tensors whose heads are contiguous runs."""
    def heads_contiguous(x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(2) == 1 and x.stride(1) == x.shape[2]
    return (heads_contiguous(q) and heads_contiguous(k) and cos.device.type == "cpu"
            and positions.dtype == torch.int64 and q.shape[0] == k.shape[0] == positions.shape[0])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
