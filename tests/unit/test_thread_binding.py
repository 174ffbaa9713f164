"""The engine's OpenMP threads pinned one to a core: which cores, and that torch's own
team ends up on them (checked in a fresh process, whose threads nothing else moves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workers.engine.config import EngineConfig
from workers.engine.thread_binding import cpus_to_pin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_threads_are_pinned_only_when_they_are_as_many_as_the_cpus() -> None:
    assert cpus_to_pin([3, 1, 2, 0], 4) == [0, 1, 2, 3]
    assert cpus_to_pin([4, 6], 2) == [4, 6]  # a container's cpuset need not start at 0
    assert cpus_to_pin([0, 1, 2, 3], 2) is None  # workers sharing the node: left to the OS
    assert cpus_to_pin([0, 1], 4) is None  # more threads than cores
    assert cpus_to_pin([5], 1) is None  # one thread: nothing waits at a barrier


def test_pin_threads_is_a_boolean_and_vllm_refuses_it_by_name() -> None:
    with pytest.raises(ValueError, match="pin_threads must be true or false, got 'no'"):
        EngineConfig(pin_threads="no")
    with pytest.raises(ValueError, match="pin_threads is not supported with backend 'vllm'"):
        EngineConfig(backend="vllm", pin_threads=False)


# On a thread of its own (as a worker steps its engine), runs torch operators on that
# thread's team before and after pinning, and reports each team thread's CPU and
# each OS thread's allowed CPUs; the main thread refuses to pin.
_PROBE = """
import json, os, threading, torch
torch.set_num_threads(len(os.sched_getaffinity(0)))
from workers.engine import thread_binding as tb
assert tb.pin_threads() is None and len(os.sched_getaffinity(0)) > 1  # the main thread
def probe():
    a = torch.randn(512, 512)
    before = (a @ a).sum().item()
    pinned = tb.pin_threads()
    after = (a @ a).sum().item()
    allowed = sorted(open(f"/proc/self/task/{t}/status").read().split("Cpus_allowed_list:")[1].split()[0]
                     for t in os.listdir("/proc/self/task"))
    gomps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line})
    print(json.dumps({"pinned": pinned, "team": tb.team_cpus(), "allowed": allowed, "same": before == after,
                      "gomps": gomps}))
    tb.unpin_threads()
    print(json.dumps({"unpinned_team_allowed": len(os.sched_getaffinity(0))}))
stepping = threading.Thread(target=probe)
stepping.start()
stepping.join()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_torchs_own_team_runs_one_thread_to_a_core_once_pinned() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    run = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": str(len(cpus))})
    assert run.returncode == 0, run.stderr
    pinned, unpinned = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert pinned["pinned"] == cpus
    # One OpenMP runtime in the process: the helper's team is torch's team.
    assert len(pinned["gomps"]) == 1, pinned["gomps"]
    assert pinned["team"] == cpus  # thread i of the team is on cpus[i]
    # One OS thread may run on each core only (the team's); the results are the same.
    single = [a for a in pinned["allowed"] if a in {str(c) for c in cpus}]
    assert sorted(single) == sorted(str(c) for c in cpus)
    assert pinned["same"]
    assert unpinned["unpinned_team_allowed"] == len(cpus)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
@pytest.mark.parametrize("pin", [True, False])
def test_an_engine_stepped_on_its_own_thread_pins_its_team_on_its_first_step(pin: bool) -> None:
    """As a worker runs it: the engine built on one thread, stepped on another, with
    as many torch threads as the process has CPUs. Its tokens do not change."""
    import threading

    import torch

    from workers.engine.engine import LLMEngine
    from workers.sampling_params import SamplingParams

    cpus = sorted(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(len(cpus))
    got: dict = {}

    def steps() -> None:
        engine = LLMEngine(EngineConfig(model="tiny-llama", num_kv_blocks=64, pin_threads=pin))
        engine.add_request("pinned", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=6))
        tokens = []
        while engine.has_unfinished_requests():
            tokens += [t for out in engine.step() for t in out.new_token_ids]
        got.update(cpus=engine.pinned_cpus, tokens=tokens,
                   allowed=len(os.sched_getaffinity(0)))
        engine.shutdown()

    try:
        stepping = threading.Thread(target=steps)
        stepping.start()
        stepping.join()
    finally:
        torch.set_num_threads(threads)
    assert got["cpus"] == (cpus if pin else None)
    assert got["allowed"] == (1 if pin else len(cpus))  # the stepping thread itself: one core
    reference = LLMEngine(EngineConfig(model="tiny-llama", num_kv_blocks=64))  # main thread: never pins
    reference.add_request("reference", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=6))
    want = []
    while reference.has_unfinished_requests():
        want += [t for out in reference.step() for t in out.new_token_ids]
    assert reference.pinned_cpus is None
    assert got["tokens"] == want and len(want) == 6
