"""What an offloading worker reports about its attention workers, for metrics: the
traffic and timings of the exchange (link.py), each attention worker's attention
compute time, and the KV each one holds."""

from __future__ import annotations

from dataclasses import dataclass

from workers.offload.link import OffloadTraffic


@dataclass(frozen=True)
class OffloadStats:
    traffic: OffloadTraffic  # a copy, totals since the worker started
    attention_s: tuple[float, ...]  # per attention worker: computing attention, in total (as last polled)
    kv_bytes_used: tuple[int, ...]  # per attention worker: its shard of the blocks in use
    kv_bytes_total: tuple[int, ...]  # per attention worker: its shard of the whole cache
