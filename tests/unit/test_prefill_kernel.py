"""The compiled prefill attention against the PyTorch path (SDPA) it replaces."""

from __future__ import annotations

import pytest
import torch

from workers.layers.attention import AttentionBatch, PrefillSlice, paged_attention
from workers.layers.cpu_kernels import load_prefill_kernel

pytestmark = pytest.mark.skipif(load_prefill_kernel(8, 4, 32) is None, reason="no C compiler to build the kernel")


def projected(tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int):
    """q, k, v as views of one fused projection's rows, as Attention.project leaves them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 2
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)


def batch(lengths: list[int], kernel) -> AttentionBatch:
    """Fresh prefill chunks one after another, their KV written to slots 0.."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return AttentionBatch(slot_mapping=torch.arange(sum(lengths)), num_decode_tokens=0, decode_block_tables=None,
                          decode_lens=None, decode_mask=None,
                          prefills=[PrefillSlice(s, s + n, n) for s, n in zip(starts, lengths)],
                          prefill_kernel=kernel)


# Fixed shapes of the tiny models and larger ones; query rows not a whole number of
# blocks of 8 (1, 13, 100); one query head per KV head, three, eight.
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths", [
    ((8, 4, 32, [256, 256, 17])), ((8, 4, 32, [1, 13, 2])), ((4, 4, 64, [100])), ((12, 4, 64, [40, 9])),
    ((16, 2, 128, [33])), ((4, 2, 8, [300])),
])
def test_kernel_matches_pytorch_path(heads, kv_heads, head_dim, lengths):
    kernel = load_prefill_kernel(heads, kv_heads, head_dim)
    q, k, v = projected(sum(lengths), heads, kv_heads, head_dim, seed=heads + sum(lengths))
    cache = torch.zeros(2, 64, 16, kv_heads, head_dim)
    scale = head_dim ** -0.5
    want = paged_attention(q, k, v, cache.clone(), batch(lengths, None), scale)
    got = paged_attention(q, k, v, cache, batch(lengths, kernel), scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float noise: sums in another order
    # The first token of each chunk attends to itself alone: its value row, exactly.
    first = [sum(lengths[:i]) for i in range(len(lengths))]
    group = heads // kv_heads
    assert torch.equal(got[first], v[first].repeat_interleave(group, dim=1))


def test_layouts_it_does_not_take_get_none():
    assert load_prefill_kernel(8, 4, 12) is None  # head_dim not a multiple of 8
    assert load_prefill_kernel(8, 4, 264) is None  # head_dim over 256
    assert load_prefill_kernel(32, 1, 32) is None  # 32 query heads on one KV head
    assert load_prefill_kernel(6, 4, 32) is None  # heads not a multiple of kv_heads


def test_rows_with_strided_heads_are_refused():
    kernel = load_prefill_kernel(8, 4, 32)
    q, k, v = projected(8, 8, 4, 32, seed=1)
    out = torch.empty(8, 8, 32)
    with pytest.raises(ValueError, match="k must be float32 with contiguous heads"):
        kernel(q, k.transpose(0, 1).contiguous().transpose(0, 1), v, out, 0.1)


@pytest.mark.parametrize("prefix", [8, 21, 39])
def test_a_cached_prefix_gives_the_bits_of_the_whole_prompt(prefix):
    """A prompt computed whole, and its last rows computed over its prefix read back from
    the cache, agree to the bit: outputs do not depend on what was cached."""
    kernel = load_prefill_kernel(8, 4, 32)
    q, k, v = projected(40, 8, 4, 32, seed=prefix)
    whole = torch.empty(40, 8, 32)
    kernel(q, k, v, whole, 0.2)
    tail = torch.empty(40 - prefix, 8, 32)
    kernel(q[prefix:], k.contiguous(), v.contiguous(), tail, 0.2)
    assert torch.equal(tail, whole[prefix:])


def test_chunk_over_cached_blocks_matches_pytorch_path():
    kernel = load_prefill_kernel(8, 4, 32)
    block_size, prefix, chunk = 4, 10, 7
    q, k, v = projected(prefix + chunk, 8, 4, 32, seed=5)
    cache = torch.zeros(2, 16, block_size, 4, 32)
    table = torch.tensor([9, 3, 12, 0, 7])  # scattered blocks holding the 17 tokens
    slots = (table[:, None] * block_size + torch.arange(block_size)).flatten()[:prefix + chunk]
    cache[0].view(-1, 4, 32)[slots[:prefix]] = k[:prefix]
    cache[1].view(-1, 4, 32)[slots[:prefix]] = v[:prefix]
    context = torch.arange(prefix + chunk)[None] <= torch.arange(prefix, prefix + chunk)[:, None]
    rows = slice(prefix, prefix + chunk)

    def run(use_kernel):
        b = AttentionBatch(slot_mapping=slots[rows], num_decode_tokens=0, decode_block_tables=None,
                           decode_lens=None, decode_mask=None,
                           prefills=[PrefillSlice(0, chunk, prefix + chunk, table, context)],
                           prefill_kernel=kernel if use_kernel else None)
        return paged_attention(q[rows], k[rows], v[rows], cache.clone(), b, 32 ** -0.5)

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-5)
