"""How far the model's forward has written the KV cache, layer by layer, for readers
on other threads.

A prefill→decode handoff sends a prompt's KV while the prefill still computes: the
blocks a forward fills are read layer by layer as soon as each layer has written them,
while the later layers compute. The forward marks each layer done here; a reader
waits for the layers it needs. On a GPU a layer's kernels are only queued when its
Python returns, so each mark carries a CUDA event that the reader waits on before
copying.
"""

from __future__ import annotations

import threading
from typing import Any, Optional


class ForwardFailed(RuntimeError):
    """The forward a reader waited on raised: the blocks it was filling hold nothing usable."""


class LayerProgress:
    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._cond = threading.Condition()
        self._forward = 0  # the latest forward begun (ids grow by one or more per forward)
        self._layers_done = num_layers  # of that forward
        self._failed: Optional[int] = None  # the latest forward that raised
        self._events: list[Any] = []  # CUDA events, one per layer done, of the current forward

    def begin(self, forward_id: int) -> None:
        with self._cond:
            self._forward, self._layers_done, self._events = forward_id, 0, []
            self._cond.notify_all()

    def layer_done(self, layer: int, event: Any = None) -> None:
        with self._cond:
            self._layers_done = layer + 1
            if event is not None:
                self._events.append(event)
            self._cond.notify_all()

    def end(self, forward_id: int, ok: bool) -> None:
        with self._cond:
            if forward_id == self._forward:
                self._layers_done = self.num_layers
            if not ok:
                self._failed = forward_id
            self._cond.notify_all()

    def wait(self, forward_id: int, layers: int, timeout_s: float) -> int:
        """Block until the first `layers` layers of forward `forward_id` are in the
        cache (at once if a later forward has begun); returns how many of its layers
        are done by then (at least `layers`). Raises ForwardFailed if it raised, and
        TimeoutError after timeout_s."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._reached(forward_id, layers), timeout_s):
                raise TimeoutError(f"layer {layers} of forward {forward_id} was not done within {timeout_s} s "
                                   f"(forward {self._forward} is at layer {self._layers_done})")
            if self._failed == forward_id:
                raise ForwardFailed(f"forward {forward_id} failed")
            if forward_id != self._forward:
                return self.num_layers
            done = self._layers_done
            event = self._events[done - 1] if len(self._events) >= done else None
        if event is not None:
            event.synchronize()  # the layer's kernels have run, not just been queued
        return done

    def _reached(self, forward_id: int, layers: int) -> bool:
        return (self._failed == forward_id or forward_id < self._forward
                or (forward_id == self._forward and self._layers_done >= layers))
