"""`yard simulate --sweep`: the cheapest cluster that meets the SLOs on a trace, as
DistServe's placement search finds one by simulation.

Sizes grow from one worker (two for a prefill and a decode pool) up to max_workers.
At each size the sweep simulates the colocated layout (that many mixed workers) and,
if asked, every prefill:decode split of it; the first size at which a layout serves
at least `attainment` of the requests within both SLOs is the answer, and among the
layouts that do at that size the one with the highest goodput. Everything else comes
from the base config (engine, policies, migration); pools are fixed at their size.
A worker's cost is its ranks (tensor_parallel_size): sizes count workers, and the
result says what they cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from cluster.config import ClusterConfig, PoolConfig
from cluster.pool_scaling import PoolScaling
from cluster.sim.cluster import SimOptions, Simulation
from cluster.sim.step_time import StepTimeModel
from cluster.sim.trace import TraceRequest
from router.config import RouterConfig


@dataclass(frozen=True, slots=True)
class Layout:
    mixed: int = 0
    prefill: int = 0
    decode: int = 0

    @property
    def workers(self) -> int:
        return self.mixed + self.prefill + self.decode

    def __str__(self) -> str:
        return f"{self.mixed} mixed" if self.mixed else f"{self.prefill}P:{self.decode}D"

    def apply(self, base: ClusterConfig) -> ClusterConfig:
        """The base config with this layout's workers (pools keep their own engine settings)."""
        if self.mixed:
            return dataclasses.replace(base, num_workers=self.mixed, pools={})
        pools = {role: dataclasses.replace(base.pools.get(role, PoolConfig()), num_workers=n, scaling=PoolScaling())
                 for role, n in (("prefill", self.prefill), ("decode", self.decode))}
        return dataclasses.replace(base, num_workers=0, pools=pools)


@dataclass(frozen=True, slots=True)
class SweepRow:
    layout: Layout
    attainment: float  # fraction of the trace's requests served within both SLOs
    summary: dict[str, Any]

    @property
    def goodput(self) -> float:
        return self.summary["goodput"]["req_s"]


def layouts(size: int, split: bool) -> list[Layout]:
    out = [Layout(mixed=size)]
    if split:
        out += [Layout(prefill=p, decode=size - p) for p in range(1, size)]
    return out


def sweep(base: ClusterConfig, router: RouterConfig, timing: StepTimeModel, trace: Sequence[TraceRequest],
          slo_ttft_s: float, slo_tpot_s: float, attainment: float = 0.9, max_workers: int = 16,
          split: bool = True, options: SimOptions = SimOptions(),
          report: Callable[[SweepRow], None] = lambda row: None) -> tuple[Optional[SweepRow], list[SweepRow]]:
    """(the cheapest layout meeting the target, or None; every row simulated)."""
    if not 0 < attainment <= 1:
        raise ValueError(f"attainment must be in (0, 1], got {attainment!r}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    rows: list[SweepRow] = []
    for size in range(1, max_workers + 1):
        passing = []
        for layout in layouts(size, split):
            summary = Simulation(layout.apply(base), router, timing, trace, options).run().summary(slo_ttft_s,
                                                                                                    slo_tpot_s)
            row = SweepRow(layout, summary["goodput"]["fraction"], summary)
            rows.append(row)
            report(row)
            if row.attainment >= attainment:
                passing.append(row)
        if passing:
            return max(passing, key=lambda r: (r.goodput, -r.layout.prefill)), rows
    return None, rows
