"""A short soak (bench/soak.py) on the e2e cluster: mixed traffic with client aborts,
disconnects and bad requests; afterwards every request was answered as it should be,
no worker holds a KV block, and no yard process grew past the bound."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from soak import KINDS, soak  # noqa: E402


def test_a_short_soak_answers_everything_and_leaks_nothing(ray_local, serve_app):
    manager = ray_local.get_actor("yard-manager-e2e", namespace="yard")
    report = soak(serve_app["base_url"], "tiny-llama", manager, duration_s=40, clients=4, sample_s=1.0)
    print({k: v for k, v in report.items() if k != "memory"})  # pytest -s shows the books
    assert report["num_problems"] == 0, report["problems"]
    assert set(report["sent"]) == set(KINDS) and sum(report["sent"].values()) >= 40, report["sent"]
    assert report["workers"] and all(w == {"held_blocks": 0, "running": 0, "waiting": 0}
                                     for w in report["workers"].values()), report["workers"]
    growth = report["memory_growth"]
    assert any(name.startswith("Worker") for name in growth) and any("router" in name for name in growth), growth
    assert all(g["within"] for g in growth.values()), growth
