"""Attention over a paged KV cache, in plain PyTorch.

The cache of one layer is a tensor [2 (K, V), num_blocks, block_size, kv_heads, head_dim].
New keys and values are written into their slots first; then each query attends to its
sequence's cached context. Decode queries (one token per sequence) run as one padded
batch; prefill chunks run one sequence at a time because their query lengths differ.
This function is the seam where a paged or flash kernel replaces it on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSlice:
    """One sequence's chunk of new tokens inside the flattened batch."""

    start: int  # first row in the batch's token dimension
    end: int
    context_len: int  # tokens attended to: cached prefix plus this chunk
    # Only when part of the context was computed in an earlier step: the block table
    # to read it back from the cache, and the causal mask offset by that prefix.
    block_table: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


@dataclass(slots=True)
class AttentionBatch:
    """Where a step's tokens go in the cache and what each one attends to.

    Decode tokens come first in the batch, then the prefill chunks.
    """

    slot_mapping: torch.Tensor  # [tokens] flat slot index (block * block_size + offset)
    num_decode_tokens: int
    decode_block_tables: Optional[torch.Tensor]  # [decodes, max_blocks]
    decode_lens: Optional[torch.Tensor]  # [decodes] context length of each
    # The PyTorch path needs [decodes, 1, 1, max_blocks * block_size], True = attend;
    # a decode kernel reads lens instead and is called as
    # kernel(q, k_cache, v_cache, tables, lens, scale).
    decode_mask: Optional[torch.Tensor]
    prefills: list[PrefillSlice]
    decode_kernel: Optional[Callable[..., torch.Tensor]] = None
    # Causal attention of a prefill chunk over its context (cached prefix and the chunk),
    # called as kernel(q, k, v, out, scale) (cpu_kernels.py).
    prefill_kernel: Optional[Callable[..., None]] = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    batch: AttentionBatch, scale: float) -> torch.Tensor:
    """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim]. Returns like q."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, batch.slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, batch.slot_mapping, v)

    out = torch.empty_like(q)
    n = batch.num_decode_tokens
    if n:
        out[:n] = _decode(q[:n], k_cache, v_cache, batch, scale)
    for p in batch.prefills:
        if batch.prefill_kernel is not None:
            _prefill_by_kernel(batch.prefill_kernel, q, k, v, k_cache, v_cache, out, p, scale)
        else:
            out[p.start:p.end] = _prefill(q, k, v, k_cache, v_cache, p, scale)
    return out


def _prefill_by_kernel(kernel: Callable[..., None], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, p: PrefillSlice,
                       scale: float) -> None:
    rows = slice(p.start, p.end)
    if p.block_table is None:  # the context is this chunk: its fresh k, v
        kernel(q[rows], k[rows], v[rows], out[rows], scale)
        return
    # A cached prefix and this chunk (already written to the cache): read back whole.
    keys = k_cache.index_select(0, p.block_table).flatten(0, 1)[:p.context_len]
    values = v_cache.index_select(0, p.block_table).flatten(0, 1)[:p.context_len]
    kernel(q[rows], keys, values, out[rows], scale)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            batch: AttentionBatch, scale: float) -> torch.Tensor:
    tables = batch.decode_block_tables
    if batch.decode_kernel is not None:
        return batch.decode_kernel(q, k_cache, v_cache, tables, batch.decode_lens, scale)
    n, width = tables.shape[0], tables.shape[1] * k_cache.shape[1]
    flat = tables.flatten()  # index_select copies whole blocks: faster than k_cache[tables]
    keys = k_cache.index_select(0, flat).view(n, width, *k_cache.shape[2:]).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(n, width, *v_cache.shape[2:]).transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=batch.decode_mask,
                                       scale=scale, enable_gqa=True)
    return o.squeeze(2)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, p: PrefillSlice, scale: float) -> torch.Tensor:
    # 4-D [1, heads, tokens, head_dim]: CPU's flash kernel takes only batched inputs.
    qs = q[p.start:p.end].transpose(0, 1).unsqueeze(0)
    if p.block_table is None:
        # The whole context is this chunk: plain causal attention on the fresh k, v.
        ks = k[p.start:p.end].transpose(0, 1).unsqueeze(0)
        vs = v[p.start:p.end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    else:
        ks = _gather(k_cache, p.block_table, p.context_len)
        vs = _gather(v_cache, p.block_table, p.context_len)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """[1, kv_heads, length, head_dim] of one sequence's cached keys or values."""
    return cache.index_select(0, table).flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
