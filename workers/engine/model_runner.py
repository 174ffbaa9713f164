"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and
returns the logits of the sequences that sample a token this step.

Owns the KV cache tensor: [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim].
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from workers.engine.freed_memory import keep_freed_memory
from workers.engine.layer_progress import LayerProgress
from workers.engine.sequence import Sequence
from workers.layers.attention import AttentionBatch, PrefillSlice
from workers.layers.cpu_kernels import load_decode_kernel, load_prefill_kernel
from workers.models.config import ModelConfig
from workers.models.llama import LlamaForCausalLM
from workers.offload.link import OffloadLink
from workers.offload.pingpong import forward_in_turns, micro_batches, rows_of
from workers.parallel.commands import RunStep
from workers.parallel.group import TPGroup

if TYPE_CHECKING:
    from workers.offload.kv_blocks import OffloadedKV  # imports Ray


def kv_block_bytes(cfg: ModelConfig, block_size: int, kv_heads: int) -> int:
    """Bytes one block takes across all layers, K and V, holding `kv_heads` heads."""
    per_token = 2 * cfg.num_layers * kv_heads * cfg.head_dim
    return per_token * block_size * torch.empty((), dtype=cfg.dtype).element_size()


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionBatch
    sample_rows: list[int]  # rows of the hidden states whose next token is sampled
    sampling: list[Sequence]  # the sequences those rows belong to (leader only)

    def wire(self) -> "StepInputs":
        """What the other ranks need: no sequences, no process-local kernel."""
        return dataclasses.replace(self, sampling=[],
                                   attention=dataclasses.replace(self.attention, decode_kernel=None,
                                                                 prefill_kernel=None))


class ModelRunner:
    def __init__(self, cfg: ModelConfig, model: LlamaForCausalLM, num_blocks: int,
                 block_size: int, device: str = "cpu", attention_backend: str = "auto",
                 tp: Optional[TPGroup] = None, offload: Optional[OffloadLink] = None,
                 offload_micro_batches: int = 1, offloaded_kv: Optional["OffloadedKV"] = None) -> None:
        self.cfg = cfg
        self.model = model
        self.tp = tp or TPGroup()
        self.block_size = block_size
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # a step's temporaries, for the next step (freed_memory.py)
        # The compiled CPU kernels handle float32 decode and fresh prefill chunks; the rest runs in PyTorch.
        use_kernel = attention_backend == "auto" and self.device.type == "cpu" and cfg.dtype == torch.float32
        self.decode_kernel = load_decode_kernel() if use_kernel else None
        self.prefill_kernel = load_prefill_kernel(model.plan.q_heads, model.plan.kv_heads, cfg.head_dim) \
            if use_kernel else None
        # This rank's KV heads only (all of them without tensor parallelism); none here
        # when attention is offloaded: the attention workers hold it.
        self.offload, self.offload_micro_batches = offload, offload_micro_batches
        self.offloaded_kv = offloaded_kv  # migration and P/D read and write the blocks there
        if offload is not None:
            model.offload_attention(offload.attend)
        self.kv_caches = torch.zeros(cfg.num_layers, 2, 0 if offload else num_blocks, block_size,
                                     model.plan.kv_heads, cfg.head_dim, dtype=cfg.dtype, device=self.device)
        self.progress = LayerProgress(cfg.num_layers)  # KV readers follow the forward layer by layer
        self.next_forward_id = 1

    def execute(self, chunks: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute `n` new tokens of each sequence; decodes (n == 1) must come first.
        Returns the sequences that reached their last known token and their logits.
        The forward is number next_forward_id, for KV readers (layer_progress.py)."""
        inputs = self.prepare(chunks)
        forward_id = self.next_forward_id
        self.next_forward_id += 1
        if self.tp.size > 1:
            self.tp.broadcast_object(RunStep(inputs.wire(), forward_id))
        return inputs.sampling, self.run(inputs, forward_id)

    def run(self, inputs: StepInputs, forward_id: int) -> torch.Tensor:
        """The forward on this rank; logits [sampled rows, vocab] (every rank gets them)."""
        self.progress.begin(forward_id)
        ok = False
        try:
            if self.offload is not None:
                hidden = self._offloaded_forward(inputs)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attention,
                                    on_layer=self._layer_done)
            ok = True
        finally:
            self.progress.end(forward_id, ok)
        if not inputs.sample_rows:
            return hidden.new_empty(0, self.cfg.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden[inputs.sample_rows])

    def _offloaded_forward(self, inputs: StepInputs) -> torch.Tensor:
        """Attention on the attention workers; a decode step in micro-batches that take turns."""
        start = time.perf_counter()
        parts = micro_batches(inputs.attention, self.offload_micro_batches)
        self.offload.begin([rows_of(inputs.attention, p) for p in parts])
        if len(parts) == 1:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attention,
                                on_layer=self._layer_done)
        else:
            hidden = forward_in_turns(self.model, self.offload, inputs.input_ids, inputs.positions, parts,
                                      on_layer=self._layer_done)
        self.offload.traffic.forward_s += time.perf_counter() - start
        return hidden

    def _layer_done(self, layer: int) -> None:
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.progress.layer_done(layer, event)

    def attach(self, wire: StepInputs) -> StepInputs:
        """Step inputs received from the leader, with this process's attention kernels."""
        wire.attention.decode_kernel = self.decode_kernel
        wire.attention.prefill_kernel = self.prefill_kernel
        if self.decode_kernel is None and wire.attention.decode_lens is not None and wire.attention.decode_mask is None:
            wire.attention.decode_mask = self._decode_mask(wire.attention.decode_lens.tolist())
        return wire

    def prepare(self, chunks: list[tuple[Sequence, int]]) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[Sequence] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSlice] = []
        bs = self.block_size
        for seq, n in chunks:
            start = seq.num_computed_tokens
            end = start + n
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            blocks = seq.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1 and not prefills:
                decode_tables.append(blocks[:(end + bs - 1) // bs])
                decode_lens.append(end)
            else:
                prefills.append(self._prefill_slice(row, n, start, blocks))
            if end == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sampling.append(seq)
        attention = AttentionBatch(
            slot_mapping=self._tensor(slots),
            num_decode_tokens=len(decode_lens),
            decode_block_tables=self._padded(decode_tables) if decode_tables else None,
            decode_lens=self._tensor(decode_lens) if decode_lens else None,
            decode_mask=self._decode_mask(decode_lens) if decode_lens and not self.decode_kernel else None,
            prefills=prefills,
            decode_kernel=self.decode_kernel,
            prefill_kernel=self.prefill_kernel,
        )
        return StepInputs(self._tensor(ids), self._tensor(positions), attention, sample_rows, sampling)

    def _prefill_slice(self, row: int, n: int, start: int, blocks: list[int]) -> PrefillSlice:
        if start == 0:
            return PrefillSlice(start=row, end=row + n, context_len=n)
        # Part of the context is already cached (an earlier chunk or a prefix hit):
        # read it back and mask causally, offset by that prefix.
        context = start + n
        table = self._tensor(blocks[:(context + self.block_size - 1) // self.block_size])
        keys = torch.arange(context, device=self.device)
        queries = torch.arange(start, context, device=self.device)
        mask = keys.unsqueeze(0) <= queries.unsqueeze(1)
        return PrefillSlice(start=row, end=row + n, context_len=context, block_table=table, mask=mask)

    def _padded(self, tables: list[list[int]]) -> torch.Tensor:
        # Padding points at block 0; the mask keeps those slots out of attention.
        width = max(len(t) for t in tables)
        for t in tables:
            t.extend([0] * (width - len(t)))
        return self._tensor(tables)

    def _decode_mask(self, lens: list[int]) -> torch.Tensor:
        width = -(-max(lens) // self.block_size) * self.block_size
        keys = torch.arange(width, device=self.device)
        return (keys.unsqueeze(0) < self._tensor(lens).unsqueeze(1)).view(len(lens), 1, 1, width)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # -- KV handoff ------------------------------------------------------------------
    def read_blocks(self, block_ids: list[int], layers: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Contents of the given blocks, all layers or layers [start, stop):
        [layers, 2, n, block_size, kv_heads, head_dim]. Safe while another thread
        steps, for blocks no step writes (full or paused) or layers the running forward
        has done (self.progress). A device cache is staged through pinned host memory
        (a DMA copy)."""
        if self.offloaded_kv is not None:
            return self.offloaded_kv.read(block_ids, layers)
        cache = self.kv_caches if layers is None else self.kv_caches[layers[0]:layers[1]]
        blocks = cache[:, :, self._tensor(block_ids)]
        if blocks.device.type == "cpu":
            return blocks
        host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
        host.copy_(blocks, non_blocking=True)
        torch.cuda.current_stream(blocks.device).synchronize()
        return host

    def write_blocks(self, block_ids: list[int], data: torch.Tensor,
                     layers: Optional[tuple[int, int]] = None) -> None:
        cache = self.kv_caches if layers is None else self.kv_caches[layers[0]:layers[1]]
        expected = (cache.shape[0], 2, len(block_ids), *cache.shape[3:])
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        if self.offloaded_kv is not None:
            self.offloaded_kv.write(block_ids, data, layers)
        else:
            cache[:, :, self._tensor(block_ids)] = data.to(cache.device, cache.dtype)
