"""CPU seconds that a server's processes spend during a benchmark run: the process
and all its descendants, sampled before and after (psutil). A process that starts
and ends between the two samples is missed; servers' processes live for the run.

Each sample keeps every process's role (its Ray actor or program name), so a run's
CPU can be split by role: proxy, router replica, worker, vLLM's API server and
engine core, ...; `per_1k_tokens` divides each by the run's output tokens."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import psutil


@dataclass(frozen=True)
class ProcessCPU:
    role: str
    cpu_s: float  # user + system seconds so far


def tree_cpu(root_pid: int, exclude: Iterable[int] = ()) -> dict[int, ProcessCPU]:
    """pid → role and CPU seconds so far, for root_pid and its descendants (those in
    `exclude`, and their descendants, left out)."""
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
            out[p.pid] = ProcessCPU(role_of(p.cmdline()), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def role_of(cmdline: list[str]) -> str:
    """A process's role from its command line. Ray actors and vLLM's engine core set
    their process title (`ray::ServeReplica:app:deployment`, `VLLM::EngineCore`);
    other processes are named by their program or script."""
    if not cmdline:
        return "?"
    title = cmdline[0]
    if title.startswith(("ray::", "VLLM::")):
        # One role per deployment: the replica suffix and a running method name go.
        return re.sub(r"\s.*$", "", title).split(".", 1)[0]
    scripts = [a for a in cmdline[1:4] if a.endswith(".py") or a in ("serve", "bench")]
    program = title.rsplit("/", 1)[-1]
    if program.startswith("python") and scripts:
        return " ".join(s.rsplit("/", 1)[-1] for s in scripts)
    return program


def by_role(before: dict[int, ProcessCPU], after: dict[int, ProcessCPU]) -> dict[str, float]:
    """CPU seconds between two samples, summed per role, largest first: growth of the
    processes in both, all of the ones that appeared (one that ended in between counts
    up to `before`)."""
    roles: dict[str, float] = {}
    for pid, now in after.items():
        was = before.get(pid)
        roles[now.role] = roles.get(now.role, 0.0) + now.cpu_s - (was.cpu_s if was else 0.0)
    return dict(sorted(roles.items(), key=lambda kv: -kv[1]))


def per_1k_tokens(roles: dict[str, float], output_tokens: int) -> dict[str, float]:
    """Each role's CPU seconds per 1,000 output tokens."""
    return {role: 1000 * s / output_tokens for role, s in roles.items()} if output_tokens else {}
