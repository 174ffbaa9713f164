"""The engine process keeps the memory a step frees, so the next step does not fault
its pages in again (workers/engine/freed_memory.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from workers.engine.freed_memory import SETTINGS, keep_freed_memory

REPO = Path(__file__).resolve().parents[2]

# A step's temporary, 16 MiB, allocated, touched and freed through the C library (as
# PyTorch's CPU allocator does), then the page faults of the next step's. With glibc's
# defaults the first goes back to the OS when freed (it was mmap'd), and the second
# faults all its pages in again; kept, the second reuses the first's pages.
STEP = textwrap.dedent("""
    import ctypes, resource, sys
    from workers.engine.freed_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory({})
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def step():
        p = libc.malloc(16 * 2**20)
        libc.memset(p, 1, 16 * 2**20)
        libc.free(p)
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}  # no MALLOC_* inherited from this process
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


def test_a_step_reuses_the_memory_the_last_one_freed() -> None:
    pages = 16 * 2**20 // 4096
    plain, kept = _faults("plain"), _faults("keep")
    assert plain >= pages * 9 // 10, plain
    assert kept < pages // 10, kept


def test_child_processes_inherit_it_and_an_operators_choice_stands() -> None:
    environ: dict[str, str] = {}
    assert keep_freed_memory(environ) and environ == SETTINGS
    chosen = {"MALLOC_TRIM_THRESHOLD_": "0"}
    assert keep_freed_memory(chosen) and chosen == {"MALLOC_TRIM_THRESHOLD_": "0"}
    preloaded = {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}
    assert keep_freed_memory(preloaded) and "MALLOC_MMAP_THRESHOLD_" not in preloaded
