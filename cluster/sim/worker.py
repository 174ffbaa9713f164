"""A simulated worker: one engine stepped back to back while it has work, and an
inbox of commands (new requests, migration calls) run between two steps, as the
worker actor's stepping thread runs them.
"""

from __future__ import annotations

from typing import Callable, Optional

from cluster.sim.engine import PlannedStep, Produced, SimEngine
from cluster.sim.loop import EventLoop

OnProduced = Callable[["SimWorker", list[Produced]], None]


class SimWorker:
    def __init__(self, worker_id: str, role: str, engine: SimEngine, loop: EventLoop, on_produced: OnProduced,
                 ready_at: float = 0.0) -> None:
        self.worker_id = worker_id
        self.role = role
        self.engine = engine
        self.loop = loop
        self.on_produced = on_produced
        self.ready_at = ready_at  # a worker added by scaling starts serving then
        self.draining = False
        self.migrating_out: set[str] = set()  # request ids with a migration out in flight
        self.migrations_in = 0
        self._inbox: list[Callable[[], None]] = []
        self._stepping = False  # a step runs, or a boundary is due now
        self.busy_s = 0.0

    @property
    def booting(self) -> bool:
        return self.loop.now < self.ready_at

    @property
    def idle(self) -> bool:
        return not self._stepping and not self._inbox and not self.engine.requests

    def post(self, command: Callable[[], None]) -> None:
        """Run `command` between two steps: now if the engine is idle, else when the
        running step ends."""
        self._inbox.append(command)
        if not self._stepping:
            self._stepping = True
            self.loop.at(max(self.loop.now, self.ready_at), self._boundary)

    def _boundary(self) -> None:
        while self._inbox:
            commands, self._inbox = self._inbox, []
            for command in commands:
                command()
        step: Optional[PlannedStep] = self.engine.plan()
        if step is None:
            self._stepping = False
            return
        self.loop.after(step.duration_s, self._step_end, step)

    def _step_end(self, step: PlannedStep) -> None:
        produced = self.engine.finish(step)
        if produced:
            self.on_produced(self, produced)
        self._boundary()
