"""What a simulation produced: one record per request and per migration, the KV usage
of every worker over time, and the summary an operator reads (percentiles,
throughput, goodput at SLOs), written as JSON and CSV.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cluster.sim.trace import TraceRequest

STATUSES = ("ok", "shed", "no_worker", "too_long", "unfinished")


@dataclass(slots=True)
class RequestRecord:
    request: TraceRequest
    status: str = "unfinished"
    workers: list[str] = field(default_factory=list)  # where it ran, in order (moves add one each)
    first_token_s: Optional[float] = None  # when the client saw it
    finished_s: Optional[float] = None
    output_tokens: int = 0

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.first_token_s is None else self.first_token_s - self.request.arrival_s

    @property
    def e2e_s(self) -> Optional[float]:
        return None if self.finished_s is None else self.finished_s - self.request.arrival_s

    @property
    def tpot_s(self) -> Optional[float]:
        """Mean time per output token after the first, as the router measures it."""
        if self.finished_s is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.finished_s - self.first_token_s) / (self.output_tokens - 1)

    def row(self) -> dict[str, Any]:
        r = self.request
        return {"request_id": r.request_id, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
                "output_tokens": self.output_tokens, "status": self.status, "ttft_s": self.ttft_s,
                "tpot_s": self.tpot_s, "e2e_s": self.e2e_s, "workers": " ".join(self.workers)}


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    migration_id: str
    request_id: str
    source: str
    destination: str
    reason: str  # a policy reason, or "handoff" (prefill to decode)
    outcome: str  # committed or aborted
    started_s: float
    ended_s: float
    stages: int
    blocks: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """A worker at one of the manager's polls."""

    time_s: float
    worker_id: str
    role: str
    used_blocks: int
    total_blocks: int
    running: int
    waiting: int


@dataclass
class SimResult:
    requests: list[RequestRecord]
    migrations: list[MigrationRecord]
    samples: list[WorkerSample]
    end_s: float  # simulated time when the last event ran
    events: int
    wall_s: float  # how long the simulation took to run
    workers: dict[str, dict[str, Any]]  # per worker: role, steps, busy seconds, preemptions
    scaling: list[str] = field(default_factory=list)  # the pools' decisions, as "time role: decision"

    def summary(self, slo_ttft_s: Optional[float] = None, slo_tpot_s: Optional[float] = None) -> dict[str, Any]:
        done = [r for r in self.requests if r.status == "ok"]
        first = min((r.request.arrival_s for r in self.requests), default=0.0)
        last = max((r.finished_s for r in done), default=first)
        span = max(last - first, 1e-9)
        statuses = {s: sum(r.status == s for r in self.requests) for s in STATUSES}
        out: dict[str, Any] = {
            "requests": len(self.requests), "statuses": statuses, "simulated_s": last - first,
            "throughput_req_s": len(done) / span,
            "throughput_output_tok_s": sum(r.output_tokens for r in done) / span,
            "ttft_s": percentiles([r.ttft_s for r in done]),
            "tpot_s": percentiles([r.tpot_s for r in done]),
            "e2e_s": percentiles([r.e2e_s for r in done]),
            "preemptions": sum(w["preemptions"] for w in self.workers.values()),
            "migrations": _count_migrations(self.migrations),
            "events": self.events, "wall_s": self.wall_s,
            "simulated_req_per_wall_s": len(self.requests) / self.wall_s if self.wall_s else None,
        }
        if slo_ttft_s is not None or slo_tpot_s is not None:
            met = [r for r in done if _meets(r, slo_ttft_s, slo_tpot_s)]
            out["goodput"] = {"slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s, "met": len(met),
                              "fraction": len(met) / len(self.requests) if self.requests else 0.0,
                              "req_s": len(met) / span}
        if self.samples:
            out["kv_usage_peak"] = max(s.used_blocks / s.total_blocks for s in self.samples)
        return out

    def write(self, out_dir: Path, summary: dict[str, Any]) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / "summary.json", out_dir / "requests.csv", out_dir / "migrations.csv",
                 out_dir / "workers.csv"]
        paths[0].write_text(json.dumps({**summary, "workers": self.workers, "scaling": self.scaling}, indent=2)
                            + "\n")
        _write_csv(paths[1], [r.row() for r in self.requests])
        _write_csv(paths[2], [asdict(m) for m in self.migrations], list(MigrationRecord.__dataclass_fields__))
        _write_csv(paths[3], [asdict(s) for s in self.samples], list(WorkerSample.__dataclass_fields__))
        return paths


def percentiles(values: Sequence[Optional[float]]) -> dict[str, Optional[float]]:
    """p50, p90, p99 and mean (nearest rank), over the values that are not None."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}

    def rank(q: float) -> float:
        return xs[max(0, math.ceil(q * len(xs)) - 1)]
    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "mean": sum(xs) / len(xs)}


def _meets(r: RequestRecord, slo_ttft_s: Optional[float], slo_tpot_s: Optional[float]) -> bool:
    if slo_ttft_s is not None and (r.ttft_s is None or r.ttft_s > slo_ttft_s):
        return False
    tpot = r.tpot_s
    return slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s


def _count_migrations(records: Sequence[MigrationRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in records:
        key = f"{m.reason}:{m.outcome}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _write_csv(path: Path, rows: list[dict[str, Any]], header: Optional[list[str]] = None) -> None:
    header = header or (list(rows[0]) if rows else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
