"""Waiting on a condition, not a fixed sleep: the tests' one way to wait."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """condition()'s first truthy value, polled every 50 ms; fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
