"""A committed move hides its request from planners while the source's report is
older than the commit, and no longer."""

from __future__ import annotations

import dataclasses

from cluster.departures import Departures
from workers.load_report import LoadReport, RequestLoad


def report(worker_id: str, at: float, *request_ids: str) -> LoadReport:
    requests = tuple(RequestLoad(rid, 0, 1, 0.0, True, False, True) for rid in request_ids)
    return LoadReport(worker_id, "mixed", True, len(requests), 0, 10, 100, 0.0, 0.0, frozenset(), at,
                      requests=requests)


def test_a_moved_request_is_hidden_until_its_source_reports_again():
    departures = Departures()
    departures.record("r1", "w0", committed_at=10.0)
    stale = {"w0": report("w0", 9.5, "r1", "r2"), "w1": report("w1", 9.9)}
    assert departures.gone(stale) == {"r1"}
    assert departures.gone(stale) == {"r1"}  # asked again before the next report: still hidden
    fresh = {**stale, "w0": report("w0", 10.2, "r2")}
    assert departures.gone(fresh) == set() and len(departures) == 0  # reflected: forgotten


def test_a_request_that_moves_back_is_seen_at_its_first_source_again():
    departures = Departures()
    departures.record("r1", "w0", committed_at=10.0)
    departures.record("r1", "w1", committed_at=12.0)  # back to w0: its last move is what counts
    reports = {"w0": report("w0", 12.5, "r1"), "w1": report("w1", 11.0, "r1")}
    assert departures.gone(reports) == {"r1"}  # w1's report predates the move back
    reports["w1"] = dataclasses.replace(reports["w1"], reported_at=12.1, requests=())
    assert departures.gone(reports) == set()


def test_departures_from_a_worker_without_a_report_are_forgotten():
    departures = Departures()
    departures.record("r1", "gone-worker", committed_at=10.0)
    departures.record("r2", "booting", committed_at=10.0)
    assert departures.gone({"booting": None}) == set() and len(departures) == 0
