"""The worker tier's configuration, validated where it is made."""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.config import EngineConfig

STREAM_UNITS = ("layer", "chunk")


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    engine: EngineConfig
    role: str = "mixed"  # mixed, prefill or decode
    pool: str = ""  # its pool in the cluster (ClusterConfig.pools); "" is the pool named by its role
    # A running request's tokens go out at most this often (its first and last at
    # once) while stream_full_at requests stream on a channel: fewer, larger messages
    # through the router and the proxy. The interval follows the requests streaming
    # in proportion (workers/channel.py): a few get each step's tokens at once; many
    # get a few tokens a chunk, up to stream_interval_max_s apart (or stream_interval_s,
    # if that is more).
    stream_interval_s: float = 0.05
    stream_full_at: int = 50
    stream_interval_max_s: float = 0.2
    max_cached_hashes: int = 4096  # bound on the block hashes a load report carries
    # Live migration, as the source: pre-copy stops once at most this many blocks of
    # KV are unsent, and the request pauses for the last copy; at most max_stages
    # pre-copy stages run before it pauses anyway (decoding may outpace the copy).
    migration_pause_blocks: int = 1
    migration_max_stages: int = 8
    # A call to the other worker slower than this (it is stuck, or cut off) ends the
    # migration or handoff; the request goes on here, and both sides free its blocks.
    migration_call_timeout_s: float = 30.0
    # A request moved here waits this long for its router to attach before it is aborted.
    migration_attach_timeout_s: float = 30.0
    # Prefill role: a handoff the decode worker refuses for want of room is tried again
    # for this long (the request decodes here meanwhile, its KV held here), then given up.
    handoff_wait_s: float = 5.0
    # Prefill role: stream the prompt's KV to the decode worker while it computes (else
    # copy it all after the first token, as DistServe does; bench/disagg.py compares).
    handoff_streaming: bool = True
    # What a streamed send waits for: each "layer" of a prefill forward (the KV leaves
    # while later layers compute), or the whole "chunk" (one send per forward: fewer,
    # larger messages, for deep models over a slow link).
    handoff_stream_unit: str = "layer"

    def __post_init__(self) -> None:
        if self.role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role must be mixed, prefill or decode, got {self.role!r}")
        if self.role != "mixed" and self.engine.backend != "yard":
            raise ValueError(f"role {self.role!r} needs KV handoff, which backend {self.engine.backend!r} does not "
                             f"have: only role 'mixed' runs it")
        if not 0 <= self.stream_interval_s <= 1:
            raise ValueError(f"stream_interval_s must be in [0, 1], got {self.stream_interval_s}")
        if self.stream_full_at < 0:
            raise ValueError(f"stream_full_at must be >= 0, got {self.stream_full_at}")
        if not 0 <= self.stream_interval_max_s <= 1:
            raise ValueError(f"stream_interval_max_s must be in [0, 1], got {self.stream_interval_max_s}")
        if not isinstance(self.migration_pause_blocks, int) or self.migration_pause_blocks < 1:
            raise ValueError(f"migration_pause_blocks must be an integer >= 1, got {self.migration_pause_blocks!r}")
        if not isinstance(self.migration_max_stages, int) or self.migration_max_stages < 1:
            raise ValueError(f"migration_max_stages must be an integer >= 1, got {self.migration_max_stages!r}")
        if not self.migration_call_timeout_s > 0:
            raise ValueError(f"migration_call_timeout_s must be > 0, got {self.migration_call_timeout_s!r}")
        if not self.handoff_wait_s >= 0:
            raise ValueError(f"handoff_wait_s must be >= 0, got {self.handoff_wait_s!r}")
        if self.handoff_stream_unit not in STREAM_UNITS:
            raise ValueError(f"handoff_stream_unit must be one of {STREAM_UNITS}, got {self.handoff_stream_unit!r}")
        if not self.migration_attach_timeout_s > 0:
            raise ValueError(f"migration_attach_timeout_s must be > 0, got {self.migration_attach_timeout_s!r}")
