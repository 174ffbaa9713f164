"""What a benchmark's JSON records about the machine it ran on."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any


def environment(*packages: str) -> dict[str, Any]:
    """Python, platform, cores, and the installed version of each named package."""
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count()}
    for name in packages:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "torch" in packages:
        import torch

        env["torch_threads"] = torch.get_num_threads()
    return env
