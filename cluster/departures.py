"""Requests that have left a worker while its last load report still lists them.

A move commits on the source, and the manager hears of it, before the source's
next report reaches the manager (reports come every poll). Until then a planner
reading that report would order the request again, and the order would come back
`aborted` (`not_here`), holding one of the source's migration slots for nothing.
The manager records each committed move here and hides the request from planners
while its source's report is older than the commit.

Times are wall clocks: the report's from the worker, the commit's from the
manager. Across nodes they may differ by the clock skew; a skew only shortens or
lengthens the hiding by that much, and neither way loses a request.

Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    from workers.load_report import LoadReport


@dataclass(frozen=True, slots=True)
class Departure:
    source: str
    committed_at: float


class Departures:
    def __init__(self) -> None:
        self._left: dict[str, Departure] = {}  # request id -> its last committed move

    def __len__(self) -> int:
        return len(self._left)

    def record(self, request_id: str, source: str, committed_at: float) -> None:
        self._left[request_id] = Departure(source, committed_at)

    def gone(self, reports: Mapping[str, Optional["LoadReport"]]) -> set[str]:
        """The request ids that a source's current report still shows but that left it
        after the report was taken. A departure that a newer report already reflects
        (or whose source is gone) is forgotten, so this stays as small as the moves
        of one poll."""
        hidden = set()
        for request_id, departure in list(self._left.items()):
            report = reports.get(departure.source)
            if report is not None and report.reported_at <= departure.committed_at:
                hidden.add(request_id)
            else:
                del self._left[request_id]
        return hidden
