"""The command loops of an instance's helper actors (tensor-parallel ranks, attention
workers): each runs as one long Ray call, and its result says when and why it ended."""

from __future__ import annotations

from typing import Optional

import ray


def ended_loop(loops: list, what: str) -> Optional[str]:
    """None while every actor's loop (`loops[i]` the ref of actor i + 1's) runs; else
    what ended the first one that ended."""
    done, _ = ray.wait(loops, num_returns=len(loops), timeout=0)
    for ref in done:
        name = f"{what} {loops.index(ref) + 1}"
        try:
            return f"{name} stopped: {ray.get(ref)}"
        except ray.exceptions.RayTaskError as e:  # the loop raised: its error, without Ray's traceback
            return f"{name} failed: {e.cause}" if e.cause is not None else f"{name} failed: {e}"
        except Exception as e:  # a dead actor
            return f"{name} failed: {e}"
    return None
