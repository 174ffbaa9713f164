"""The engine process keeps the memory a step frees, so the next step does not fault
its pages in again (workers/engine/freed_memory.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from workers.engine.freed_memory import SETTINGS, keep_freed_memory

REPO = Path(__file__).resolve().parents[2]

# Two steps' worth of temporaries to warm up, then the page faults of a third: 8 x 12 MiB
# allocated, touched and freed, as a prefill step's products are.
STEP = textwrap.dedent("""
    import resource, sys, torch
    from workers.engine.freed_memory import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory({})
    def step():
        temps = [torch.ones(3 * 2**20) for _ in range(8)]
        del temps
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}  # no MALLOC_* inherited from this process
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


def test_a_step_reuses_the_memory_the_last_one_freed() -> None:
    plain, kept = _faults("plain"), _faults("keep")
    assert plain > 8 * 3 * 2**20 * 4 // 4096 // 2, plain  # glibc's default faults in most of 96 MiB again
    assert kept < plain // 4, (kept, plain)


def test_child_processes_inherit_it_and_an_operators_choice_stands() -> None:
    environ: dict[str, str] = {}
    assert keep_freed_memory(environ) and environ == SETTINGS
    chosen = {"MALLOC_TRIM_THRESHOLD_": "0"}
    assert keep_freed_memory(chosen) and chosen == {"MALLOC_TRIM_THRESHOLD_": "0"}
    preloaded = {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}
    assert keep_freed_memory(preloaded) and "MALLOC_MMAP_THRESHOLD_" not in preloaded
