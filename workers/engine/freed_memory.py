"""Keep the memory a step frees for the next step, instead of handing it back to the OS.

A forward allocates tens of megabytes of temporaries (a prefill step of 2,048 tokens:
a 12 MiB gate/up product per layer, and more) and frees them at its end. glibc's
malloc serves blocks that large with mmap, or returns the top of its heap to the OS
once enough is free, so every step faulted the same pages in again, zeroed by the
kernel: on a 2-core machine a prefill step took ~12% longer than with the memory kept
(docs/performance.md, *Fixed*). vLLM's CPU guide asks for
tcmalloc in LD_PRELOAD for the same reason; this needs nothing installed.

`keep_freed_memory` sets glibc's thresholds in this process (mallopt) and in the
environment, for the processes it starts later (vLLM's rank processes read it at
their start). An operator's own MALLOC_* settings or a preloaded allocator win.
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
from typing import MutableMapping

# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to it come from the heap
TRIM_THRESHOLD = 2**30  # free memory at the heap's top kept before any goes back
SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def _operator_chose(environ: MutableMapping[str, str]) -> bool:
    preload = environ.get("LD_PRELOAD", "")
    return any(name in environ for name in SETTINGS) or "tcmalloc" in preload or "jemalloc" in preload


def keep_freed_memory(environ: MutableMapping[str, str] = os.environ) -> bool:
    """True if glibc now keeps freed memory in this process (or an operator's choice
    stands); False where the C library is not glibc."""
    if _operator_chose(environ):
        return True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return False
    environ.update(SETTINGS)
    return True
