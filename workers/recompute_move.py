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
from typing import Any, Awaitable, Callable, Optional

from workers.events import WorkerRequest
from workers.migration import MigrationOrder, MigrationResult
from workers.sampling_params import SamplingParams
from workers.worker_commands import TakeForRecompute


def recompute_refusal(params: SamplingParams) -> Optional[str]:
    """Why a request must not move by recompute, or None if it may."""
    if params.seed is not None:
        return f"seeded sampling (seed {params.seed}) would restart its random sequence"
    if params.presence_penalty or params.frequency_penalty:
        return "presence/frequency penalties would stop counting the tokens already sent"
    return None


async def move_by_recompute(order: MigrationOrder, source_id: str, request: WorkerRequest,
                            call: Callable[[Any], Awaitable[Any]], take_back: Callable[[WorkerRequest, Any], None],
                            moved: Callable[[MigrationOrder, int], None], timeout_s: float,
                            own_layout: Any = None) -> MigrationResult:
    """Take `request` out of the source's engine (call), hand it to the destination
    with its tokens so far, then tell its router (moved). If the destination refuses,
    the request is computed again here (take_back) and its router never notices.

    `own_layout`: the source engine's KV handover layout (VLLMEngine.handover_layout),
    or None. Where the destination's is the same, the request's KV goes along, and the
    destination computes only its last token instead of all of it."""
    def result(outcome: str, error: Optional[str] = None, **extra: Any) -> MigrationResult:
        return MigrationResult(order.migration_id, order.request_id, source_id, order.destination_id,
                               order.reason, outcome, error, **extra)

    refusal = recompute_refusal(request.params)
    if refusal is not None:
        return result("failed", f"unsupported: request {request.request_id} cannot move by recompute: {refusal}")
    with_kv = own_layout is not None and await _destination_layout(order, timeout_s) == own_layout
    paused = time.monotonic()
    try:
        tokens, kv = await call(TakeForRecompute(request.request_id, with_kv))
    except ValueError as e:
        return result("failed", f"not_here: {e}")
    resumed = dataclasses.replace(request, resume_token_ids=tokens)
    try:
        await asyncio.wait_for(order.destination.adopt.remote(resumed, source_id, order.migration_id, kv), timeout_s)
    except Exception as e:  # noqa: BLE001 - refused, unreachable or dead: it goes on here
        take_back(resumed, kv)
        # An adopt that timed out may still land: the destination would compute the
        # request beside us until its attach timeout. Nothing waits on this call.
        order.destination.abandon.remote(request.request_id, order.migration_id)
        return result("aborted", f"refused: {type(e).__name__}: {e}")
    moved(order, len(tokens))
    now = time.monotonic()
    blocks, size = (0, 0) if kv is None else (kv.num_blocks, kv.num_bytes)
    return result("committed", paused_s=now - paused, next_index=len(tokens), committed_at=now,
                  stages=int(kv is not None), blocks=blocks, bytes=size, copy_s=now - paused if kv else 0.0)


async def _destination_layout(order: MigrationOrder, timeout_s: float) -> Any:
    """The destination's KV handover layout; None if it takes no KV or does not say."""
    try:
        return await asyncio.wait_for(order.destination.handover_layout.remote(), timeout_s)
    except Exception:  # noqa: BLE001 - it may be gone: the adopt call will tell
        return None
