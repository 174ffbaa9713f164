"""An attention worker: a Ray actor that holds its KV heads' shard of the paged KV
cache and computes attention for those heads, layer after layer, as the model worker
sends each layer's q, k and v (link.py). The model worker's scheduler owns the block
tables; this worker only holds the blocks, at the ids the step's batch names."""

from __future__ import annotations

import time
from typing import Optional

import torch

from workers.layers.attention import AttentionBatch, paged_attention
from workers.layers.cpu_kernels import load_decode_kernel, load_prefill_kernel
from workers.models.config import DTYPES
from workers.offload.commands import AttendStep, AttentionCommand, StopAttending
from workers.offload.heads import HeadShard
from workers.parallel.group import TPGroup, join_group


class AttentionWorker:
    def __init__(self, rank: int, size: int, shard: HeadShard, num_layers: int, num_blocks: int, block_size: int,
                 head_dim: int, dtype: str, device: str, timeout_s: float) -> None:
        self.rank, self.size, self.shard = rank, size, shard
        self.num_layers, self.block_size, self.head_dim = num_layers, block_size, head_dim
        self.dtype, self.device = getattr(torch, dtype) if dtype in DTYPES else torch.float32, torch.device(device)
        self.num_blocks, self.timeout_s = num_blocks, timeout_s
        self.scale = head_dim ** -0.5
        self.attention_s = 0.0  # computing attention (writing k, v included), read by metrics
        self.group: Optional[TPGroup] = None
        self.kv_caches: Optional[torch.Tensor] = None
        use_kernel = self.device.type == "cpu" and self.dtype == torch.float32
        self.decode_kernel = load_decode_kernel() if use_kernel else None
        self.prefill_kernel = load_prefill_kernel(self.shard.q_heads, self.shard.kv_heads, head_dim) \
            if use_kernel else None

    def join(self, host: str, port: int) -> int:
        """Join the model worker's group, then allocate this shard of the KV cache."""
        self.group = join_group(None, host, port, self.rank, self.size, self.timeout_s)
        self.kv_caches = torch.zeros(self.num_layers, 2, self.num_blocks, self.block_size, self.shard.kv_heads,
                                     self.head_dim, dtype=self.dtype, device=self.device)
        return self.rank

    def serve(self) -> str:
        """Follow the model worker's steps until it says stop; a failed exchange ends
        it with an error."""
        while True:
            command: AttentionCommand = self.group.broadcast_object(idle=True)
            if isinstance(command, StopAttending):
                return "stopped"
            if not isinstance(command, AttendStep):
                raise ValueError(f"unknown attention command {command!r}")
            self._attend([self._attach(b) for b in command.batches])

    def attention_seconds(self) -> float:
        return self.attention_s

    def read_blocks(self, block_ids: list[int], layers: Optional[tuple[int, int]]) -> torch.Tensor:
        """This shard of some blocks, for migration (kv_blocks.py): [layers, 2, n,
        block_size, kv_heads of the shard, head_dim], in host memory."""
        return self._layers(layers)[:, :, self._ids(block_ids)].cpu()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor, layers: Optional[tuple[int, int]]) -> None:
        cache = self._layers(layers)
        expected = (cache.shape[0], 2, len(block_ids), *cache.shape[3:])
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data for attention worker {self.rank} has shape {tuple(data.shape)}, "
                             f"expected {expected}")
        cache[:, :, self._ids(block_ids)] = data.to(cache.device, cache.dtype)

    def _layers(self, layers: Optional[tuple[int, int]]) -> torch.Tensor:
        return self.kv_caches if layers is None else self.kv_caches[layers[0]:layers[1]]

    def _ids(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def _attend(self, batches: list[AttentionBatch]) -> None:
        pg, s, d = self.group.pg, self.shard, self.head_dim
        split = (s.q_heads * d, s.kv_heads * d, s.kv_heads * d)
        for layer in range(self.num_layers):
            for i, batch in enumerate(batches):
                tokens, tag = batch.slot_mapping.shape[0], layer * len(batches) + i
                wire = torch.empty(tokens, sum(split), dtype=self.dtype)  # gloo moves host memory
                pg.recv([wire], 0, tag).wait()
                start = time.perf_counter()
                q, k, v = wire.to(self.device).split(split, dim=1)
                o = paged_attention(q.view(tokens, s.q_heads, d), k.reshape(tokens, s.kv_heads, d),
                                    v.reshape(tokens, s.kv_heads, d), self.kv_caches[layer], batch, self.scale)
                out = o.flatten(1).contiguous().cpu()
                self.attention_s += time.perf_counter() - start
                pg.send([out], 0, tag).wait()

    def _attach(self, batch: AttentionBatch) -> AttentionBatch:
        batch.decode_kernel = self.decode_kernel
        batch.prefill_kernel = self.prefill_kernel
        if self.decode_kernel is None and batch.decode_lens is not None:
            lens = batch.decode_lens
            width = batch.decode_block_tables.shape[1] * self.block_size
            keys = torch.arange(width, device=lens.device)
            batch.decode_mask = (keys.unsqueeze(0) < lens.unsqueeze(1)).view(lens.shape[0], 1, 1, width)
        return batch
