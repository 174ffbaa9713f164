"""What a worker actor's calls hand to its stepping thread, the only thread that
touches the engine. Commands are applied between two engine steps, in order.

Requests come and go with AddRequest and AbortRequest; their results are events.
The migration commands each do one engine call and answer through a future, which
the actor's loop awaits.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from workers.events import WorkerRequest

if TYPE_CHECKING:
    from workers.engine.engine import LLMEngine
    from workers.engine.handoff import MigratedRequest
    from workers.experts.table import PlacementTable


@dataclass(frozen=True, slots=True)
class AddRequest:
    request: WorkerRequest
    kv: Any = None  # a handed-over request's KV (workers/vllm/kv_handover.py), for engines that take it


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class StartMigration:
    """Source: begin moving a request out; answers its token count."""

    migration_id: str
    request_id: str

    def apply(self, engine: "LLMEngine") -> int:
        return engine.start_migration(self.migration_id, self.request_id)


@dataclass(frozen=True, slots=True)
class AdvanceMigration:
    """Source: the next pre-copy stage, or, once at most `pause_at_blocks` blocks are
    unsent, the pause with the last stage and the request's state."""

    migration_id: str
    pause_at_blocks: int
    during_prefill: str = "pause"  # a handoff's: "stream" or "wait" (no pause before the first token)

    def apply(self, engine: "LLMEngine") -> Any:
        return engine.advance_migration(self.migration_id, self.pause_at_blocks, self.during_prefill)


@dataclass(frozen=True, slots=True)
class StreamMigration:
    """Source, a streaming handoff: the blocks its prompt fills by the end of the
    next forward, taken before that forward runs (with Call.before_forward)."""

    migration_id: str

    def apply(self, engine: "LLMEngine") -> Any:
        return engine.stream_migration(self.migration_id)


@dataclass(frozen=True, slots=True)
class ResumeMigration:
    """Source: the migration ended without commit; the request carries on here."""

    migration_id: str

    def apply(self, engine: "LLMEngine") -> None:
        engine.resume_after_migration(self.migration_id)


@dataclass(frozen=True, slots=True)
class CompleteMigration:
    """Source: the destination committed; the request leaves, its blocks are freed."""

    migration_id: str

    def apply(self, engine: "LLMEngine") -> int:
        return engine.complete_migration(self.migration_id)


@dataclass(frozen=True, slots=True)
class ReserveMigration:
    """Destination: blocks for an incoming request's KV."""

    migration_id: str
    request_id: str
    num_tokens: int

    def apply(self, engine: "LLMEngine") -> tuple[int, ...]:
        return engine.reserve_migration(self.migration_id, self.request_id, self.num_tokens)


@dataclass(frozen=True, slots=True)
class GrowReservation:
    migration_id: str
    num_tokens: int

    def apply(self, engine: "LLMEngine") -> tuple[int, ...]:
        return engine.grow_reservation(self.migration_id, self.num_tokens)


@dataclass(frozen=True, slots=True)
class CommitMigration:
    migration_id: str
    state: "MigratedRequest"

    def apply(self, engine: "LLMEngine") -> None:
        engine.commit_migration(self.migration_id, self.state)


@dataclass(frozen=True, slots=True)
class CancelMigration:
    """Destination: drop the reservation (the source gave up or died)."""

    migration_id: str

    def apply(self, engine: "LLMEngine") -> bool:
        return engine.cancel_migration(self.migration_id)


@dataclass(frozen=True, slots=True)
class CopyFullBlocks:
    """Source of a move with KV handover, while the request still runs: copies of its
    full blocks from first_block on (or None)."""

    request_id: str
    first_block: int

    def apply(self, engine: Any) -> Any:
        return engine.copy_full_blocks(self.request_id, self.first_block)


@dataclass(frozen=True, slots=True)
class TakeForRecompute:
    """Source of a move by recompute: the request leaves the engine, unended; answers
    its output tokens so far, and with_kv, a copy of its KV from first_block on (or None)."""

    request_id: str
    with_kv: bool = False
    first_block: int = 0

    def apply(self, engine: Any) -> tuple[tuple[int, ...], Any]:
        return engine.take_for_recompute(self.request_id, self.with_kv, self.first_block)


@dataclass(frozen=True, slots=True)
class ReplaceExperts:
    """Begin a live re-placement of the experts (expert parallelism)."""

    table: "PlacementTable"

    def apply(self, engine: "LLMEngine") -> None:
        engine.replace_experts(self.table)


EngineCall = Union[StartMigration, AdvanceMigration, StreamMigration, ResumeMigration, CompleteMigration,
                   ReserveMigration, GrowReservation, CommitMigration, CancelMigration, ReplaceExperts, TakeForRecompute,
                   CopyFullBlocks]


@dataclass(frozen=True, slots=True)
class Call:
    """An EngineCall and where its answer (or exception) goes. With after_step, it is
    applied only once the engine's step count exceeds that (right after the step that
    does it, before the next one starts); with before_forward, inside the next step,
    once its batch is planned and before the model runs it. Either way, at once when
    the engine has nothing to step."""

    command: EngineCall
    reply: Future = field(default_factory=Future)
    after_step: Optional[int] = None
    before_forward: bool = False


Command = Union[AddRequest, AbortRequest, Call]
