"""Fault injection under 64 streams (bench/faults.py) on a cluster of its own: two
tensor-parallel (TP=2) workers behind two router replicas. A killed worker, TP rank or
manager loses, duplicates and changes no token of any stream; a killed router replica
ends its own streams with an error and disturbs no other. Each time the cluster gets
back to full strength: the manager replaces the worker, Ray restarts the manager (which
adopts the running workers), Serve replaces the replica."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from faults import FAULTS, run_fault, workload  # noqa: E402

APP = "faults"
STREAMS = 64
HTTP_STREAMS = 8  # of the 64: streamed completions over HTTP, the rest gRPC
MAX_TOKENS = 32  # mid-stream at the fault (it waits for 4 tokens each), short for the suite
WORKERS, REPLICAS = 2, 2


@pytest.fixture(scope="module")
def faults_app(ray_local, serve_app):
    from ray import serve

    from router.app import build_app

    app = build_app({"cluster": {"name": "faults", "num_workers": WORKERS, "worker_cpus": 0.5,
                                 "load_poll_interval_s": 0.2,
                                 "engine": {"model": serve_app["model_dir"], "tensor_parallel_size": 2,
                                            "tp_cpus_per_rank": 0.5}},
                     "router": {"served_model_name": "tiny-llama", "max_queue_per_worker": 256},
                     "replicas": REPLICAS, "router_cpus": 0.25})
    serve.run(app, name=APP, route_prefix="/faults")
    manager = ray_local.get_actor("yard-manager-faults", namespace="yard")
    yield {"manager": manager, "target": serve_app["grpc_target"], "model_dir": serve_app["model_dir"],
           "http_base": serve_app["base_url"] + "/faults"}
    serve.delete(APP)
    ray_local.get(manager.shutdown.remote())
    ray_local.kill(manager)


@pytest.mark.parametrize("fault", FAULTS)
def test_no_token_is_lost_or_duplicated_when_a_part_dies(faults_app, fault):
    specs = workload(faults_app["model_dir"], STREAMS, max_tokens=MAX_TOKENS, seed=FAULTS.index(fault), tag=fault,
                     http_streams=HTTP_STREAMS)
    report = run_fault(fault, faults_app["target"], APP, faults_app["manager"], specs, WORKERS, REPLICAS,
                       http_base=faults_app["http_base"])
    print(report)  # pytest -s shows the books
    assert report["lost"] == report["duplicated"] == report["wrong"] == report["errored_wrong"] == 0, report
    assert report["clean_short_ends"] == report["http_clean_short_ends"] == report["http_wrong"] == 0, report
    assert report["held_blocks"] and not any(report["held_blocks"].values()), report
    if fault == "router":
        # The killed replica's streams end with an error naming the cause; the
        # other replica's finish whole.
        assert 0 < report["errored_streams"] + report["http_errored"] < STREAMS, report
    else:
        assert report["errored_streams"] == report["http_errored"] == 0, report
        assert report["http_whole"] == HTTP_STREAMS, report
        assert report["tokens_received"] == report["tokens_expected"] == (STREAMS - HTTP_STREAMS) * MAX_TOKENS
    if fault == "manager":
        import ray

        assert ray.get(faults_app["manager"].status.remote())["restarted"]
