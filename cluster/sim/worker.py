"""A simulated worker: one engine stepped back to back while it has work, and an
inbox of commands (new requests, migration calls) run between two steps, as the
worker actor's stepping thread runs them. Stretches in which the batch only decodes
run as one event (cluster/sim/decode_run.py); whoever reads the engine meanwhile
(through `engine`) sees it as it would be step by step.
"""

from __future__ import annotations

from typing import Callable, Optional

from cluster.sim.decode_run import DecodeRun
from cluster.sim.engine import PlannedStep, Produced, SimEngine
from cluster.sim.loop import EventLoop

OnProduced = Callable[["SimWorker", list[Produced]], None]


class SimWorker:
    def __init__(self, worker_id: str, role: str, engine: SimEngine, loop: EventLoop, on_produced: OnProduced,
                 ready_at: float = 0.0, decode_runs: bool = True) -> None:
        self.worker_id = worker_id
        self.role = role
        self._engine = engine
        self.decode_runs = decode_runs
        self.loop = loop
        self.on_produced = on_produced
        self.ready_at = ready_at  # a worker added by scaling starts serving then
        self.draining = False
        self.migrating_out: set[str] = set()  # request ids with a migration out in flight
        self.migrations_in = 0
        self._inbox: list[Callable[[], None]] = []
        self._stepping = False  # a step runs, or a boundary is due now
        self._run: Optional[DecodeRun] = None
        self._run_version = 0  # the run end event that counts (a cut run ends earlier)

    @property
    def engine(self) -> SimEngine:
        """The engine as the step-by-step simulation would have it now."""
        if self._run is not None:
            self._run.materialize(self.loop.now)
        return self._engine

    @property
    def booting(self) -> bool:
        return self.loop.now < self.ready_at

    @property
    def idle(self) -> bool:
        return not self._stepping and not self._inbox and not self._engine.requests

    def post(self, command: Callable[[], None]) -> None:
        """Run `command` between two steps: now if the engine is idle, else when the
        running step ends."""
        self._inbox.append(command)
        if self._run is not None:
            self._run.cut(self.loop.now)  # the command runs after the step under way
            self._await_run_end()
        elif not self._stepping:
            self._stepping = True
            self.loop.at(max(self.loop.now, self.ready_at), self._boundary)

    def _boundary(self) -> None:
        while self._inbox:
            commands, self._inbox = self._inbox, []
            for command in commands:
                command()
        if self.decode_runs:
            self._run = DecodeRun.start(self._engine, self.loop.now)
            if self._run is not None:
                self._await_run_end()
                return
        step: Optional[PlannedStep] = self._engine.plan()
        if step is None:
            self._stepping = False
            return
        self.loop.after(step.duration_s, self._step_end, step)

    def _step_end(self, step: PlannedStep) -> None:
        produced = self._engine.finish(step)
        if produced:
            self.on_produced(self, produced)
        self._boundary()

    def _await_run_end(self) -> None:
        self._run_version += 1
        self.loop.at(self._run.end_s, self._run_end, self._run_version)

    def _run_end(self, version: int) -> None:
        if version != self._run_version or self._run is None:
            return  # the run was cut: a later event ends it
        run, self._run = self._run, None
        produced = run.finish()
        if produced:
            self.on_produced(self, produced)
        self._boundary()
