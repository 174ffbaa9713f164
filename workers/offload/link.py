"""The model worker's end of attention offloading. Once per step it broadcasts the
batch's layout; per layer it sends each attention worker the q, k and v of its heads
and receives that worker's attention output, point to point over the group made for
the worker (gloo on CPU, NCCL on CUDA). No KV block crosses: only per-token vectors."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from workers.layers.attention import AttentionBatch
from workers.offload.commands import AttendStep
from workers.offload.heads import HeadShard
from workers.parallel.group import RankFailure, TPGroup


@dataclass
class OffloadTraffic:
    """What crossed to and from the attention workers, for metrics and benchmarks."""

    steps: int = 0
    layer_calls: int = 0
    bytes_out: int = 0  # q, k, v sent
    bytes_in: int = 0  # attention outputs received
    tokens: int = 0  # token-layers sent (a token counts once per layer)
    wait_s: float = 0.0  # the model worker's time from sending a layer's q, k, v to the last output


class OffloadLink:
    def __init__(self, group: TPGroup, shards: list[HeadShard]) -> None:
        self.group, self.shards = group, shards
        self.traffic = OffloadTraffic()

    def begin(self, batch: AttentionBatch) -> None:
        """A forward begins; every layer of it then calls attend()."""
        wire = dataclasses.replace(batch, decode_kernel=None, decode_mask=None)
        self.group.broadcast_object(AttendStep(wire))
        self.traffic.steps += 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [tokens, heads, head_dim]; k, v [tokens, kv_heads, head_dim] → the attention
        output [tokens, heads, head_dim], each worker's heads in place."""
        start = time.perf_counter()
        pg, outs, sends = self.group.pg, [], []
        for j, s in enumerate(self.shards):
            packed = torch.cat([q[:, s.q_start:s.q_start + s.q_heads].flatten(1),
                                k[:, s.kv_start:s.kv_start + s.kv_heads].flatten(1),
                                v[:, s.kv_start:s.kv_start + s.kv_heads].flatten(1)], dim=1)
            sends.append(pg.send([packed], j + 1, layer))
            self.traffic.bytes_out += packed.numel() * packed.element_size()
            outs.append(q.new_empty(q.shape[0], s.q_heads, q.shape[2]))
        receives = [pg.recv([out], j + 1, layer) for j, out in enumerate(outs)]
        try:
            for work in sends + receives:
                work.wait()
        except RuntimeError as e:
            raise RankFailure(f"attention worker failed at layer {layer}: {e}") from e
        self.traffic.bytes_in += sum(o.numel() * o.element_size() for o in outs)
        self.traffic.layer_calls += 1
        self.traffic.tokens += q.shape[0]
        self.traffic.wait_s += time.perf_counter() - start
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
