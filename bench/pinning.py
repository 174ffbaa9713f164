"""Pinning for benchmarks that compare layouts which would each own a device: each
process onto a core of its own, one torch thread, so that they do not share compute."""

from __future__ import annotations

import os
from typing import Any


def pin(pid: int, core: int) -> None:
    """Every thread of a process onto one core (threads made later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass  # the thread ended meanwhile


def pin_actor(actor: Any, core: int) -> None:
    """A Ray actor's process onto one core, with one torch thread. The actor must take a
    call beside any loop it runs (max_concurrency >= 2)."""
    import ray

    pid = ray.get(actor.__ray_call__.remote(lambda self: (__import__("torch").set_num_threads(1),
                                                          __import__("os").getpid())[1]))
    pin(pid, core)
