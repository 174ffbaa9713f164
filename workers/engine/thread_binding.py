"""Pins the engine's OpenMP threads, one to a core, when the engine has its
process's cores to itself.

torch runs each operator on a team of OpenMP threads, and a team waits at the end of
every parallel region for its slowest thread. On a node where other processes want
CPU too (the router replica, Serve's proxy, a client), the OS moves unpinned threads
around and now and then puts two of the team on one core; the others then spin at
the barrier on cores the neighbours needed. With `bench/engine_burst.py --busy-cores 1`
(one core kept busy beside the engine), pinned threads computed the burst's prompts
1.5x faster; on an idle machine it makes no difference (docs/performance.md). vLLM's
CPU workers pin their threads for the same reason.

The engine pins only when its threads are as many as the CPUs its process may use:
then each thread gets a core of its own and no other engine thread in the process
is affected. With fewer threads than CPUs (several workers sharing a node's cores,
as Ray's logical CPUs allow) it leaves them to the OS: pinning each worker's team to
the first cores would stack the workers on them. It never pins a process's main
thread: the processes that thread starts (Ray, servers, compilers) would inherit its
one core. A worker steps its engine on a thread of its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Optional, Sequence

import torch

from workers.layers.cpu_kernels import AFFINITY_SOURCE, load_library

log = logging.getLogger(__name__)

# The CPUs this process may use, as it started: a pinned thread's own set is one core.
PROCESS_CPUS = sorted(os.sched_getaffinity(0))


def cpus_to_pin(allowed: Sequence[int], threads: int) -> Optional[list[int]]:
    """The core of each thread of the team, in team order, or None to leave the
    threads to the OS."""
    if threads < 2 or threads != len(allowed):
        return None
    return sorted(allowed)


def pin_threads() -> Optional[list[int]]:
    """Pin the calling thread's OpenMP team (the thread itself is thread 0) if
    `cpus_to_pin` says so; returns the cores, or None if the threads were left
    alone. Call it from the thread that will run the model."""
    if threading.current_thread() is threading.main_thread():
        return None
    cpus = cpus_to_pin(PROCESS_CPUS, torch.get_num_threads())
    if cpus is None or not _set_affinity(cpus, pin=True):
        return None
    log.info("the engine's %d threads are pinned to CPUs %s", len(cpus), cpus)
    return cpus


def unpin_threads() -> None:
    """Every thread of the calling thread's team may run on any of the process's
    CPUs again (what pin_threads undoes)."""
    _set_affinity(PROCESS_CPUS, pin=False)


def team_cpus() -> list[int]:
    """The CPU each thread of the calling thread's team is on now (for tests)."""
    lib = load_library(AFFINITY_SOURCE)
    if lib is None:
        raise RuntimeError("the thread affinity helper could not be built (no C compiler?)")
    threads = torch.get_num_threads()
    out = (ctypes.c_int * threads)()
    lib.omp_thread_cpus(out, threads)
    return list(out)


def _set_affinity(cpus: list[int], pin: bool) -> bool:
    lib = load_library(AFFINITY_SOURCE)
    if lib is None:
        return False
    threads = torch.get_num_threads()
    failed = lib.set_omp_thread_affinity((ctypes.c_int * len(cpus))(*cpus), len(cpus), threads, int(pin))
    if failed:
        log.warning("could not set the CPUs of %d of the engine's %d threads", failed, threads)
    return failed == 0
