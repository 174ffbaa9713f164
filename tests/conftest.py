"""Shared fixtures: tiny models made once per session in a temporary directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

# Preset models (`--model tiny-llama`) are cached under a per-run directory so tests
# never depend on, or write into, the user's cache.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["YARD_CACHE_DIR"] = str(tmp_path_factory.mktemp("yard-cache"))


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_model(kind, **make_tiny_model kwargs) → directory, made once per argument set."""
    from workers.models.tiny import make_tiny_model

    made: dict[str, Path] = {}

    def make(kind: str, **kwargs: Any) -> Path:
        key = kind + json.dumps(kwargs, sort_keys=True)
        if key not in made:
            made[key] = make_tiny_model(kind, tmp_path_factory.mktemp(kind), **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where Ray's Prometheus endpoint listens for this test session (loopback port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local(metrics_port):
    """One local Ray instance for every test that needs it. Logical CPUs are
    oversubscribed on purpose: tensor-parallel ranks mostly wait on each other."""
    import ray

    from cluster.serve_env import STREAMING_SERVE_ENV, apply_serve_env

    apply_serve_env(STREAMING_SERVE_ENV)  # the Serve settings `yard serve` runs with
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()
