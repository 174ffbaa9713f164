"""`yard simulate --sweep`: the cheapest cluster that meets the SLOs on a trace, found
by simulation, as DistServe's placement search finds one.

A layout meets the target when at least `attainment` of the trace's requests are
served within both SLOs. The sweep finds
  * the fewest colocated (mixed) workers that meet it: a binary search over sizes up
    to max_workers, as more workers of the same kind never serve worse;
  * if asked, the fewest workers split into a prefill and a decode pool that meet it:
    a binary search over sizes again, each size judged by its best split, found by
    climbing from the split that matches the trace's prefill and decode work (the
    step-time model's) to whichever neighbour attains more.
The answer is the smaller of the two; at equal size the one with the higher goodput,
then the colocated one. Everything else comes from the base config (engine, policies,
migration); pools are fixed at their size. Sizes count workers: the result also says
their ranks (tensor_parallel_size each).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from cluster.config import ClusterConfig, PoolConfig
from cluster.pool_scaling import PoolScaling
from cluster.sim.cluster import SimOptions, Simulation
from cluster.sim.step_time import BatchShape, StepTimeModel
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


def layouts_upto(max_workers: int) -> list[Layout]:
    """Every layout of at most max_workers workers, smallest first."""
    return [layout for size in range(1, max_workers + 1)
            for layout in [Layout(mixed=size)] + [Layout(prefill=p, decode=size - p) for p in range(1, size)]]


class _Search:
    def __init__(self, base: ClusterConfig, router: RouterConfig, timing: StepTimeModel,
                 trace: Sequence[TraceRequest], slo_ttft_s: float, slo_tpot_s: float, attainment: float,
                 options: SimOptions, report: Callable[[SweepRow], None]) -> None:
        self.base, self.router, self.timing, self.trace = base, router, timing, trace
        self.slo = (slo_ttft_s, slo_tpot_s)
        self.target = attainment
        self.options = options
        self.report = report
        self.rows: dict[Layout, SweepRow] = {}  # every layout simulated, in order

    def row(self, layout: Layout) -> SweepRow:
        if layout not in self.rows:
            summary = Simulation(layout.apply(self.base), self.router, self.timing, self.trace,
                                 self.options).run().summary(*self.slo)
            self.rows[layout] = SweepRow(layout, summary["goodput"]["fraction"], summary)
            self.report(self.rows[layout])
        return self.rows[layout]

    def meets(self, row: SweepRow) -> bool:
        return row.attainment >= self.target

    def smallest(self, low: int, high: int, judge: Callable[[int], SweepRow]) -> Optional[SweepRow]:
        """The row of the smallest size in [low, high] whose judged row meets the target."""
        best = None
        while low <= high:
            mid = (low + high) // 2
            row = judge(mid)
            if self.meets(row):
                best, high = row, mid - 1
            else:
                low = mid + 1
        return best

    def best_split(self, size: int) -> SweepRow:
        """The split of `size` workers attaining most (then the most goodput): a climb
        from the split that matches the trace's prefill and decode work."""
        def key(p: int) -> tuple[float, float]:
            r = self.row(Layout(prefill=p, decode=size - p))
            return (r.attainment, r.goodput)
        p = min(size - 1, max(1, round(size * prefill_share(self.trace, self.timing))))
        while True:
            better = [q for q in (p - 1, p + 1) if 1 <= q < size and key(q) > key(p)]
            if not better:
                return self.row(Layout(prefill=p, decode=size - p))
            p = max(better, key=key)


def prefill_share(trace: Sequence[TraceRequest], timing: StepTimeModel) -> float:
    """The part of the trace's model time that is prefill, by the step-time model
    (each request alone: a start for the split search, not a prediction)."""
    prefill = decode = 0.0
    for r in trace:
        prefill += timing.step_s(BatchShape(r.prompt_tokens, r.prompt_tokens * (r.prompt_tokens + 1) // 2, 0, 0))
        context = r.output_tokens * r.prompt_tokens + r.output_tokens * (r.output_tokens - 1) // 2
        decode += timing.step_s(BatchShape(0, 0, 1, context // max(r.output_tokens, 1))) * (r.output_tokens - 1)
    return prefill / (prefill + decode) if prefill + decode else 0.5


def sweep(base: ClusterConfig, router: RouterConfig, timing: StepTimeModel, trace: Sequence[TraceRequest],
          slo_ttft_s: float, slo_tpot_s: float, attainment: float = 0.9, max_workers: int = 16,
          split: bool = True, options: SimOptions = SimOptions(),
          report: Callable[[SweepRow], None] = lambda row: None) -> tuple[Optional[SweepRow], list[SweepRow]]:
    """(the cheapest layout meeting the target, or None; every row simulated, in order)."""
    if not 0 < attainment <= 1:
        raise ValueError(f"attainment must be in (0, 1], got {attainment!r}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    search = _Search(base, router, timing, trace, slo_ttft_s, slo_tpot_s, attainment, options, report)
    colocated = search.smallest(1, max_workers, lambda n: search.row(Layout(mixed=n)))
    candidates = [colocated] if colocated else []
    if split and max_workers >= 2:
        # A split larger than the colocated answer cannot be cheaper: search below it.
        high = colocated.layout.workers if colocated else max_workers
        pd = search.smallest(2, high, search.best_split) if high >= 2 else None
        if pd is not None:
            candidates.append(pd)
    best = min(candidates, key=lambda r: (r.layout.workers, -r.goodput, r.layout.prefill), default=None)
    return best, list(search.rows.values())
