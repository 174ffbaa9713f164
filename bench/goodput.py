"""SLO attainment and goodput, as DistServe defines them (standard library only).

A request attains the SLO when its TTFT and its TPOT both meet their targets. A
system's goodput is the highest request rate, per worker, at which at least the
target share (90%) of requests attain it: found on a sweep of rates by linear
interpolation between the last point at or above the target and the first below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def scaled(self, factor: float) -> "SLO":
        return SLO(self.ttft_s * factor, self.tpot_s * factor)


@dataclass(frozen=True)
class Latency:
    """One request as the client saw it; None where it failed or gave one token."""

    ttft_s: Optional[float]
    tpot_s: Optional[float]
    ok: bool


def attained(r: Latency, slo: SLO) -> bool:
    # A request with one output token has no TPOT: its TTFT decides.
    return r.ok and r.ttft_s is not None and r.ttft_s <= slo.ttft_s and (r.tpot_s is None or r.tpot_s <= slo.tpot_s)


def attainment(requests: Sequence[Latency], slo: SLO) -> float:
    """Share of requests that meet both targets (failed ones count as missed)."""
    if not requests:
        raise ValueError("attainment of no requests")
    return sum(attained(r, slo) for r in requests) / len(requests)


def goodput(points: Sequence[tuple[float, float]], target: float = 0.9) -> Optional[float]:
    """The rate where attainment crosses `target`, from (rate, attainment) points.

    Points are sorted by rate. Below the first point at or above the target there is
    nothing to say (None). If every point meets it, the highest rate is a lower bound
    and is returned as is. Otherwise the crossing is interpolated between the last
    point that meets it (scanning up from the lowest rate) and the next one."""
    pts = sorted(points)
    if not pts or pts[0][1] < target:
        return None
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return pts[-1][0]


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of nothing")
    xs = sorted(values)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
