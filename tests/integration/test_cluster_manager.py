"""The cluster manager on a local Ray: registry, load polling, replacing a dead worker."""

from __future__ import annotations

import time

import pytest

from cluster.config import ClusterConfig
from cluster.manager import ClusterManager
from workers.engine.config import EngineConfig


def test_manager_registers_polls_and_replaces(ray_local, make_model):
    config = ClusterConfig(name="t-manager", engine=EngineConfig(model=str(make_model("tiny-llama"))),
                           num_workers=2, worker_cpus=0.5, load_poll_interval_s=0.2, health_timeout_s=10.0)
    manager = ray_local.remote(ClusterManager).remote(config)
    try:
        assert ray_local.get(manager.start.remote(), timeout=120) == 2
        snapshot = ray_local.get(manager.snapshot.remote())
        assert sorted(s.worker_id for s in snapshot) == ["t-manager-w0", "t-manager-w1"]
        assert all(s.healthy and s.load.free_blocks == s.load.total_blocks for s in snapshot)
        ray_local.kill(snapshot[0].handle)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ids = {s.worker_id: s.healthy for s in ray_local.get(manager.snapshot.remote())}
            if ids == {"t-manager-w1": True, "t-manager-w2": True}:
                break
            time.sleep(0.2)
        assert ids == {"t-manager-w1": True, "t-manager-w2": True}
        assert ray_local.get(manager.status.remote())["replaced"] == 1
    finally:
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="num_workers must be an integer >= 1, got 0"):
        ClusterConfig(num_workers=0)
    with pytest.raises(ValueError, match=r"unknown engine settings \['blok_size'\]"):
        ClusterConfig.from_dict({"engine": {"blok_size": 8}})
    assert ClusterConfig.from_dict({"num_workers": 3, "engine": {"block_size": 8}}).engine.block_size == 8
