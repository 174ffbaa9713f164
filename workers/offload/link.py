"""The model worker's end of attention offloading. Once per step it broadcasts the
batch's layout; per layer it sends each attention worker the q, k and v of its heads
and receives that worker's attention output, point to point over the group made for
the worker. No KV block crosses: only per-token vectors.

The group is gloo, which moves host memory only: on CUDA the vectors are staged
through the host on both sides (a device-to-device transport, NCCL, is still to
come)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

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
    # Per micro-batch and layer, from sending q, k, v to having the outputs: attention
    # plus transfer, summed (micro-batches in flight together count each).
    exchange_s: float = 0.0
    blocked_s: float = 0.0  # of that, the time the model worker sat waiting for outputs (none hidden)
    forward_s: float = 0.0  # whole offloaded forwards; forward_s - blocked_s is the dense compute here


class OffloadLink:
    def __init__(self, group: TPGroup, shards: list[HeadShard]) -> None:
        self.group, self.shards = group, shards
        self.traffic = OffloadTraffic()
        self.micro_batches = 1  # of the forward under way

    def begin(self, batches: list[AttentionBatch]) -> None:
        """A forward begins, in these micro-batches; every layer of it then sends each
        micro-batch's q, k, v in order (send, receive, or attend for one)."""
        wires = [dataclasses.replace(b, decode_kernel=None, prefill_kernel=None, decode_mask=None) for b in batches]
        try:
            self.group.broadcast_object(AttendStep(wires))
        except RankFailure as e:  # a worker died between steps: name it as the exchange does
            raise RankFailure(f"attention worker failed at the step's start: {e}") from e
        self.micro_batches = len(batches)
        self.traffic.steps += 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One micro-batch: q [tokens, heads, head_dim]; k, v [tokens, kv_heads, head_dim]
        → the attention output [tokens, heads, head_dim], each worker's heads in place."""
        return self.receive(self.send(layer, 0, q, k, v))

    def send(self, layer: int, micro_batch: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Exchange:
        """Send a micro-batch's q, k, v of `layer` to every attention worker and post the
        receives of their outputs; nothing waits yet."""
        exchange = Exchange(layer, time.perf_counter(), q.shape[0], q.device)
        try:
            self._post(exchange, layer * self.micro_batches + micro_batch, q, k, v)
        except RuntimeError as e:  # posting fails at once on a connection a dead worker closed
            raise RankFailure(f"attention worker failed at layer {layer}: {e}") from e
        return exchange

    def _post(self, exchange: Exchange, tag: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        pg = self.group.pg
        for j, s in enumerate(self.shards):
            packed = torch.cat([q[:, s.q_start:s.q_start + s.q_heads].flatten(1),
                                k[:, s.kv_start:s.kv_start + s.kv_heads].flatten(1),
                                v[:, s.kv_start:s.kv_start + s.kv_heads].flatten(1)], dim=1)
            wire = packed.cpu()  # gloo sends host memory (no copy on CPU)
            exchange.sent.append(wire)  # alive until the send completes
            exchange.works.append(pg.send([wire], j + 1, tag))
            self.traffic.bytes_out += wire.numel() * wire.element_size()
            out = torch.empty(q.shape[0], s.q_heads, q.shape[2], dtype=q.dtype)
            exchange.outputs.append(out)
            exchange.works.append(pg.recv([out], j + 1, tag))

    def receive(self, exchange: Exchange) -> torch.Tensor:
        """The outputs of an exchange sent earlier, once every worker has answered."""
        waited = time.perf_counter()
        try:
            for work in exchange.works:
                work.wait()
        except RuntimeError as e:
            raise RankFailure(f"attention worker failed at layer {exchange.layer}: {e}") from e
        done = time.perf_counter()
        self.traffic.blocked_s += done - waited
        self.traffic.exchange_s += done - exchange.sent_at
        outs = exchange.outputs
        self.traffic.bytes_in += sum(o.numel() * o.element_size() for o in outs)
        self.traffic.layer_calls += 1
        self.traffic.tokens += exchange.tokens
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return out.to(exchange.device)  # no copy on CPU


@dataclass
class Exchange:
    """One micro-batch's q, k, v of one layer on their way, and its outputs to come."""

    layer: int
    sent_at: float
    tokens: int
    device: torch.device  # where the model worker wants the outputs
    sent: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    works: list = field(default_factory=list)
