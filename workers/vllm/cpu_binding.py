"""Which CPUs each of vLLM's tensor-parallel rank processes runs on, on CPU.

vLLM's CPU build binds each rank's OpenMP threads to cores. Its default ("auto")
gives every rank a NUMA node of its own, and refuses to start with more ranks than
NUMA nodes: so on a one-node machine (most containers), tensor_parallel_size 2 did
not start at all. Unless the operator chose a binding (VLLM_CPU_OMP_THREADS_BIND),
the worker splits the CPUs its process may run on among its ranks instead.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Sequence

BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def rank_cpu_lists(cpus: Sequence[int], ranks: int) -> list[list[int]]:
    """`cpus` in `ranks` contiguous shares, as even as they go; with fewer CPUs than
    ranks, ranks share them round-robin (they still run, only slower)."""
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    if not cpus:
        raise ValueError("no CPU to bind vLLM's ranks to")
    cpus = sorted(cpus)
    if len(cpus) < ranks:
        return [[cpus[r % len(cpus)]] for r in range(ranks)]
    base, extra = divmod(len(cpus), ranks)
    shares, start = [], 0
    for r in range(ranks):
        size = base + (r < extra)
        shares.append(cpus[start:start + size])
        start += size
    return shares


def bind_ranks(ranks: int, environ: MutableMapping[str, str] = os.environ) -> str:
    """Set vLLM's binding for `ranks` rank processes from this process's CPUs, unless
    one is set already (an operator's choice wins); returns the binding in effect."""
    if environ.get(BIND_VARIABLE, "auto") == "auto" and ranks > 1:
        shares = rank_cpu_lists(sorted(os.sched_getaffinity(0)), ranks)
        environ[BIND_VARIABLE] = "|".join(",".join(map(str, share)) for share in shares)
    return environ.get(BIND_VARIABLE, "auto")
