"""Live migration between workers on two Ray nodes (ray.cluster_utils.Cluster on one
machine): the KV crosses nodes through the object store, and the output is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_migration_across_two_nodes(make_model):
    model = str(make_model("tiny-llama"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("migration_across_nodes.py")), model],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["nodes"][0] != seen["nodes"][1]
    assert seen["committed"], seen["error"]
    assert seen["blocks"] >= 4
    assert seen["exact"] and seen["num_tokens"] == 200
    assert seen["attempts"] == [["a", False], ["b", True]]
    assert seen["all_free"]
