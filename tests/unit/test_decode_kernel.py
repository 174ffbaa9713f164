"""The compiled CPU decode kernel against the PyTorch attention path it replaces."""

from __future__ import annotations

import pytest
import torch

from workers.layers.attention import AttentionBatch, paged_attention
from workers.layers.cpu_kernels import load_decode_kernel

kernel = load_decode_kernel()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C compiler to build the kernel")


def batch(tables: torch.Tensor, lens: torch.Tensor, block_size: int, use_kernel: bool) -> AttentionBatch:
    width = tables.shape[1] * block_size
    mask = (torch.arange(width)[None] < lens[:, None]).view(len(lens), 1, 1, width)
    return AttentionBatch(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(lens),
                          decode_block_tables=tables, decode_lens=lens,
                          decode_mask=None if use_kernel else mask, prefills=[],
                          decode_kernel=kernel if use_kernel else None)


# The vector path with fixed loop lengths (32/2, 64/1, 128/4, 128/8 as head_dim/group),
# with run-time ones (16/1, 32/4, 64/3, 8/6), and the scalar path (head_dim 12 is no
# multiple of 8; 32 query heads on one KV head is a larger group than the vector path's).
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 32), (4, 4, 64), (8, 2, 128), (16, 2, 128),
                                                     (4, 4, 16), (8, 2, 32), (12, 4, 64), (6, 1, 8),
                                                     (4, 2, 12), (32, 1, 8)])
def test_kernel_matches_pytorch_path(heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads)
    num_blocks, block_size, n, max_blocks = 64, 4, 9, 7
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    # Scattered, distinct blocks per sequence; lengths 1 .. full, not block-aligned.
    tables = torch.randperm(num_blocks, generator=gen)[:n * max_blocks].view(n, max_blocks)
    lens = torch.tensor([1, 2, 4, 5, 13, 16, 27, 28, 17])
    q = torch.randn(n, heads, head_dim, generator=gen)
    empty = torch.empty(0, kv_heads, head_dim)
    scale = head_dim ** -0.5
    got = paged_attention(q, empty, empty, cache, batch(tables, lens, block_size, True), scale)
    expected = paged_attention(q, empty, empty, cache, batch(tables, lens, block_size, False), scale)
    assert (got - expected).abs().max().item() < 1e-5


def test_single_token_context_returns_its_value():
    cache = torch.randn(2, 4, 2, 1, 8)
    tables = torch.tensor([[3, 0]])
    q = torch.randn(1, 2, 8)
    out = kernel(q, cache[0], cache[1], tables, torch.tensor([1]), 0.5)
    # One key: softmax weight 1, so each head's output is that slot's value exactly.
    assert torch.equal(out, cache[1, 3, 0, 0].expand(1, 2, 8))
