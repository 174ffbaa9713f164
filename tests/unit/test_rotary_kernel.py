"""The compiled rotary kernel against the PyTorch formula it replaces: the same bits."""

from __future__ import annotations

import pytest
import torch

from workers.layers.rotary import RotaryEmbedding
from workers.models.config import RopeScaling

rotary = RotaryEmbedding(32, 64, 10000.0, None, torch.float32)
pytestmark = pytest.mark.skipif(rotary.kernel is None, reason="no C compiler to build the kernel")


def reference(x: torch.Tensor, emb: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
    """Out of place, as transformers writes it: x * cos + rotate_half(x) * sin, halves apart."""
    cos = emb.cos[positions].unsqueeze(1)
    sin = emb.sin[positions].unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int):
    """q, k, v as the fused projection leaves them: column ranges of one row-major output."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 3
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    return qkv, q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v


# 2,048 rows take the threaded loop, 3 rows (a decode step) the single-threaded one;
# head sizes with and without whole vectors of halves; Llama 3's scaled frequencies.
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,scaling", [
    (2048, 8, 4, 32, None), (3, 8, 4, 32, None), (300, 4, 4, 64, None), (17, 6, 2, 12, None),
    (64, 8, 2, 128, RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=512)),
])
def test_kernel_gives_the_pytorch_bits(tokens, heads, kv_heads, head_dim, scaling):
    emb = RotaryEmbedding(head_dim, 4096, 500000.0, scaling, torch.float32)
    qkv, q, k, v = qkv_views(tokens, heads, kv_heads, head_dim, seed=tokens)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(1))
    positions[0], positions[-1] = 0, 4095
    want_q, want_k, want_v = reference(q, emb, positions), reference(k, emb, positions), v.clone()
    emb(positions, q, k)
    assert torch.equal(q, want_q)
    assert torch.equal(k, want_k)
    assert torch.equal(v, want_v)  # the columns between and after are left alone


def test_pytorch_path_also_rotates_in_place():
    emb = RotaryEmbedding(32, 64, 10000.0, None, torch.float32)
    emb.kernel = None
    _, q, k, _ = qkv_views(5, 8, 4, 32, seed=3)
    positions = torch.tensor([0, 1, 7, 30, 63])
    want_q, want_k = reference(q, emb, positions), reference(k, emb, positions)
    emb(positions, q, k)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_position_outside_the_table_is_named_and_nothing_is_touched():
    qkv, q, k, _ = qkv_views(4, 8, 4, 32, seed=4)
    before = qkv.clone()
    with pytest.raises(IndexError, match="position 64 is outside the rotary table of 64 positions"):
        rotary(torch.tensor([0, 5, 64, 2]), q, k)
    assert torch.equal(qkv, before)
