"""CPU seconds that a server's processes spend during a benchmark run: the process
and all its descendants, sampled before and after (psutil). A process that starts
and ends between the two samples is missed; servers' processes live for the run."""

from __future__ import annotations

from typing import Iterable

import psutil


def tree_cpu(root_pid: int, exclude: Iterable[int] = ()) -> dict[int, float]:
    """pid → user + system CPU seconds so far, for root_pid and its descendants
    (those in `exclude`, and their descendants, left out)."""
    skip = set(exclude)
    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    for p in list(procs):
        if p.pid in skip:
            try:
                skip.update(c.pid for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    out = {}
    for p in procs:
        if p.pid in skip:
            continue
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two samples: growth of the processes in both, all of the
    ones that appeared (a process that ended in between counts up to `before`)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())
