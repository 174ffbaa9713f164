"""Moving a request without yard's live migration: the source takes it out of its
engine and the destination computes it again from the prompt plus the tokens already
sent (as failover resumes), while the router follows the Moved event as for a live
migration. What a worker whose engine cannot live-migrate (vLLM's) does instead, so
that draining it does not wait for its requests to finish. Between two vLLM workers
with the same KV layout the request's KV goes along (workers/vllm/kv_handover.py),
and the destination computes only its last token.

A request moves this way only if the destination continues it as it would have gone
on: greedy or unseeded sampling, no presence or frequency penalty (vLLM would count
the resumed tokens as prompt, not output). Anything else stays where it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

from workers.events import WorkerRequest
from workers.migration import MigrationOrder, MigrationResult
from workers.sampling_params import SamplingParams
from workers.worker_commands import CopyFullBlocks, TakeForRecompute


def recompute_refusal(params: SamplingParams) -> Optional[str]:
    """Why a request must not move by recompute, or None if it may."""
    if params.seed is not None:
        return f"seeded sampling (seed {params.seed}) would restart its random sequence"
    if params.presence_penalty or params.frequency_penalty:
        return "presence/frequency penalties would stop counting the tokens already sent"
    return None


@dataclass(frozen=True, slots=True)
class HandoverSettings:
    """How the source copies a request's KV where the destination takes it."""

    own_layout: Any = None  # the source engine's KV handover layout (None: recompute only)
    pause_blocks: int = 1  # pre-copy stops once a stage copied at most this many blocks
    max_stages: int = 8  # pre-copy stages at most, before the request pauses anyway


async def move_by_recompute(order: MigrationOrder, source_id: str, request: WorkerRequest,
                            call: Callable[[Any], Awaitable[Any]], take_back: Callable[[WorkerRequest, Any], None],
                            moved: Callable[[MigrationOrder, int], None], timeout_s: float,
                            handover: HandoverSettings = HandoverSettings()) -> MigrationResult:
    """Take `request` out of the source's engine (call), hand it to the destination
    with its tokens so far, then tell its router (moved). If the destination refuses,
    the request is computed again here (take_back) and its router never notices.

    Where the destination's KV handover layout is the source's own, the request's KV
    goes along: its full blocks are pre-copied while it decodes here, in stages, then
    it pauses for the rest, and the destination computes only its last token."""
    def result(outcome: str, error: Optional[str] = None, **extra: Any) -> MigrationResult:
        return MigrationResult(order.migration_id, order.request_id, source_id, order.destination_id,
                               order.reason, outcome, error, **extra)

    refusal = recompute_refusal(request.params)
    if refusal is not None:
        return result("failed", f"unsupported: request {request.request_id} cannot move by recompute: {refusal}")
    with_kv = handover.own_layout is not None and await _destination_layout(order, timeout_s) == handover.own_layout
    copied = _Copied()
    started = time.monotonic()
    if with_kv:
        try:
            await _pre_copy(order, request.request_id, call, timeout_s, handover, copied)
        except Exception as e:  # noqa: BLE001 - the destination is gone or stuck: the request never left
            order.destination.abandon.remote(request.request_id, order.migration_id)
            return result("aborted", f"refused: pre-copy: {type(e).__name__}: {e}", **copied.figures(started))
    try:
        tokens, kv = await call(TakeForRecompute(request.request_id, with_kv, copied.next_block))
    except ValueError as e:  # it ended (or left) meanwhile: nothing broke
        order.destination.abandon.remote(request.request_id, order.migration_id)
        return result("aborted", f"not_here: {e}")
    # Paused from here: until the call ran, between two steps, it decoded on. (yard's
    # live migration counts its pause from the same point.)
    paused = time.monotonic()
    copied.add(kv)
    resumed = dataclasses.replace(request, resume_token_ids=tokens)
    try:
        await asyncio.wait_for(order.destination.adopt.remote(resumed, source_id, order.migration_id, kv), timeout_s)
    except Exception as e:  # noqa: BLE001 - refused, unreachable or dead: it goes on here
        # Back into the source's engine: with its KV if all of it was copied in the
        # pause, else computed again.
        take_back(resumed, kv if kv is not None and kv.first_block == 0 else None)
        # An adopt that timed out may still land: the destination would compute the
        # request beside us until its attach timeout. Nothing waits on this call.
        order.destination.abandon.remote(request.request_id, order.migration_id)
        return result("aborted", f"refused: {type(e).__name__}: {e}")
    moved(order, len(tokens))
    now = time.monotonic()
    return result("committed", paused_s=now - paused, next_index=len(tokens), committed_at=now,
                  **copied.figures(started))


@dataclass
class _Copied:
    """KV sent so far in one handover."""

    stages: int = 0
    blocks: int = 0
    bytes: int = 0
    next_block: int = 0  # the first block not yet sent

    def add(self, part: Any) -> None:
        if part is None:
            return
        self.stages += 1
        self.blocks += part.num_blocks
        self.bytes += part.num_bytes
        self.next_block = part.first_block + part.num_blocks

    def figures(self, started: float) -> dict[str, Any]:
        return {"stages": self.stages, "blocks": self.blocks, "bytes": self.bytes,
                "copy_s": time.monotonic() - started if self.stages else 0.0, "payloads": self.stages}


async def _pre_copy(order: MigrationOrder, request_id: str, call: Callable[[Any], Awaitable[Any]], timeout_s: float,
                    handover: HandoverSettings, copied: _Copied) -> None:
    """Send the request's full blocks while it decodes here, until a stage finds at
    most pause_blocks new ones (what the pause then copies is that small)."""
    for _ in range(handover.max_stages):
        part = await call(CopyFullBlocks(request_id, copied.next_block))
        if part is None:
            return
        await asyncio.wait_for(order.destination.prestage_kv.remote(order.migration_id, part), timeout_s)
        copied.add(part)
        if part.num_blocks <= handover.pause_blocks:
            return


async def _destination_layout(order: MigrationOrder, timeout_s: float) -> Any:
    """The destination's KV handover layout; None if it takes no KV or does not say."""
    try:
        return await asyncio.wait_for(order.destination.handover_layout.remote(), timeout_s)
    except Exception:  # noqa: BLE001 - it may be gone: the adopt call will tell
        return None
