"""An offloading worker's KV blocks, read and written on its attention workers, for
migration and prefill→decode handoff. Each attention worker answers for its KV heads;
the model worker puts them side by side, so the blocks that leave look exactly like a
plain worker's ([layers, 2, n, block_size, kv_heads, head_dim]) and either kind of
worker can take them.

These are Ray calls beside the attention workers' step loop (they take a second
call): the same rule as a plain worker's cache makes them safe while a step runs.
They touch only blocks no step writes (full, paused or reserved ones), or layers the
running forward has finished, and a layer is finished here only once every attention
worker has answered for it, after writing its k and v."""

from __future__ import annotations

from typing import Optional

import ray
import torch

from workers.offload.heads import HeadShard

Layers = Optional[tuple[int, int]]


class OffloadedKV:
    def __init__(self, workers: list, shards: list[HeadShard], timeout_s: float) -> None:
        self.workers, self.shards, self.timeout_s = workers, shards, timeout_s

    def read(self, block_ids: list[int], layers: Layers = None) -> torch.Tensor:
        parts = self._get([w.read_blocks.remote(block_ids, layers) for w in self.workers], "read")
        return torch.cat(parts, dim=4) if len(parts) > 1 else parts[0]

    def write(self, block_ids: list[int], data: torch.Tensor, layers: Layers = None) -> None:
        heads = [data[:, :, :, :, s.kv_start:s.kv_start + s.kv_heads].contiguous() for s in self.shards]
        self._get([w.write_blocks.remote(block_ids, part, layers) for w, part in zip(self.workers, heads)], "write")

    def _get(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            raise RuntimeError(f"could not {what} KV blocks on the attention workers: {e}") from e
