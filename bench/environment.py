"""What a benchmark's JSON records about the machine it ran on."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_results(report: Any, name: str, path: Optional[Path] = None) -> Path:
    """Write a benchmark's report as JSON (default: bench/results/<name>-<timestamp>.json)
    and say where."""
    out = path or RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return out
