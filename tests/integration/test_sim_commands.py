"""`yard profile` on the real engine (a small grid), then `yard simulate` reading its
file: the files and pictures an operator gets, and the errors they see."""

from __future__ import annotations

import csv
import json

import pytest

from cluster.cli import main
from cluster.sim.profile import ProfileGrid, profile
from cluster.sim.step_time import StepTimeModel
from workers.engine.model_runner import kv_block_bytes
from workers.models.config import load_model_config

GRID = ProfileGrid(prefill_lengths=(16, 64), prefill_batch=(1, 3), decode_batch=(1, 6), decode_context=(16, 96),
                   mixed=((3, 32, 48),), decode_steps=2)


def test_profile_times_each_planned_batch_shape_and_fits_the_model(make_model, tmp_path):
    model_dir = make_model("tiny-llama")
    result = profile(str(model_dir), repeats=1, grid=GRID, log=lambda _: None)
    shapes = {(s.prefill_tokens, s.decode_seqs) for s, _ in result.samples}
    assert shapes == {(16, 0), (48, 0), (64, 0), (192, 0), (0, 1), (0, 6), (48, 3)}
    assert len(result.samples) == 4 + 2 * 2 * GRID.decode_steps + 1  # decode shapes differ by context
    assert all(seconds > 0 for _, seconds in result.samples)
    config = load_model_config(model_dir)
    assert result.model.kv_block_bytes == kv_block_bytes(config, 16, config.num_kv_heads)
    assert result.model.max_position_embeddings == config.max_position_embeddings
    assert result.model.transfer_bytes_per_s > 0
    result.model.save(tmp_path / "m.json")
    assert StepTimeModel.load(tmp_path / "m.json") == result.model


def step_model(path):
    StepTimeModel(0.005, 1e-4, 1e-8, 1e-4, 1e-6, model="hand-made", kv_block_bytes=65536,
                  max_position_embeddings=2048, transfer_bytes_per_s=5e8).save(path)
    return path


def test_simulate_writes_its_summary_records_and_pictures(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     + "".join(f"{0.2 * i},{100 + 13 * i},{20 + i}\n" for i in range(25)))
    config = tmp_path / "serve.yaml"
    config.write_text("cluster:\n  num_workers: 3\n  engine: {num_kv_blocks: 64}\n"
                      "router: {policy: least_load}\nhttp: {port: 8000}\n")
    out = tmp_path / "out"
    code = main(["simulate", "--trace", str(trace), "--config", str(config), "--step-time",
                 str(step_model(tmp_path / "m.json")), "--time-scale", "2", "--slo-ttft", "1", "--slo-tpot", "0.05",
                 "--out", str(out), "--plot"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["statuses"]["ok"] == 25 and summary["scale"]["time_scale"] == 2.0
    assert set(summary["workers"]) == {"yard-w0", "yard-w1", "yard-w2"}
    assert json.loads(capsys.readouterr().out.split("\nwrote ")[0])["requests"] == 25
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert [int(r["output_tokens"]) for r in rows] == [20 + i for i in range(25)]
    assert {r["workers"] for r in rows} == {"yard-w0", "yard-w1", "yard-w2"}
    for png in ("latency_cdf.png", "load_per_worker.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_names_what_is_wrong_in_one_line(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,x\n")
    model = step_model(tmp_path / "m.json")
    assert main(["simulate", "--trace", str(trace), "--step-time", str(model)]) == 2
    assert "t.csv line 2: num_decode_tokens must be an integer >= 1, got 'x'" in capsys.readouterr().err
    config = tmp_path / "serve.yaml"
    config.write_text("router: {policy: session_affinity, policy_options: {fallback: fastest}}\n")
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,3\n")
    assert main(["simulate", "--trace", str(trace), "--step-time", str(model), "--config", str(config)]) == 2
    assert "unknown fallback policy 'fastest' for session_affinity; known: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(trace), "--step-time", str(model), "--time-scale", "0"])
