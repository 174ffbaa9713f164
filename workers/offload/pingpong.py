"""A decode step in m micro-batches that take turns (MegaScale-Infer's ping-pong):
while the attention workers compute one micro-batch's attention at a layer, the model
worker runs another's dense part (o_proj, MLP, the next layer's q, k, v). A step with
prefill chunks, or fewer decodes than m, runs as one batch."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from workers.layers.attention import AttentionBatch
from workers.models.llama import LlamaForCausalLM
from workers.offload.link import Exchange, OffloadLink


def micro_batches(batch: AttentionBatch, m: int) -> list[slice]:
    """The token rows of each micro-batch: m near-equal runs of a decode-only batch,
    else the whole batch."""
    n = batch.slot_mapping.shape[0]
    if m == 1 or batch.prefills or n < m:
        return [slice(0, n)]
    bounds = [i * n // m for i in range(m + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(m)]


def rows_of(batch: AttentionBatch, rows: slice) -> AttentionBatch:
    """The decode-only batch's layout for some of its rows."""
    if rows == slice(0, batch.slot_mapping.shape[0]):
        return batch
    mask = batch.decode_mask[rows] if batch.decode_mask is not None else None
    return AttentionBatch(slot_mapping=batch.slot_mapping[rows], num_decode_tokens=rows.stop - rows.start,
                          decode_block_tables=batch.decode_block_tables[rows], decode_lens=batch.decode_lens[rows],
                          decode_mask=mask, prefills=[], decode_kernel=batch.decode_kernel)


@torch.inference_mode()
def forward_in_turns(model: LlamaForCausalLM, link: OffloadLink, input_ids: torch.Tensor, positions: torch.Tensor,
                     parts: list[slice], on_layer: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """The model's forward, micro-batch `parts` in turns (link.begin already sent their
    layouts). Hidden states [tokens, hidden] after the final norm, in batch order."""
    layers = model.layers
    xs = [model.embed(input_ids[p]) for p in parts]
    pos = [positions[p] for p in parts]

    def send(i: int, mb: int) -> Exchange:
        attn = layers[i].self_attn
        q, k, v = attn.project(layers[i].input_layernorm(xs[mb]), pos[mb], model.rotary)
        return link.send(i, mb, q, k, v)

    pending = [send(0, mb) for mb in range(len(parts))]
    for i, layer in enumerate(layers):
        for mb in range(len(parts)):
            o = link.receive(pending[mb])
            x = xs[mb] + layer.self_attn.output(o)
            xs[mb] = x + layer.mlp(layer.post_attention_layernorm(x))
            if i + 1 < len(layers):
                pending[mb] = send(i + 1, mb)
        if on_layer is not None:
            on_layer(i)
    return model.norm(torch.cat(xs))
