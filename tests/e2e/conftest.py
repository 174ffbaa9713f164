"""One Serve application for the e2e tests: two workers on the tiny model, HTTP on a
free loopback port."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_app(ray_local, make_model):
    from ray import serve

    from router.app import build_app

    port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": grpc_port,
                              "grpc_servicer_functions": ["router.grpc_stubs.add_YardServicer_to_server"]})
    model = str(make_model("tiny-llama"))
    app = build_app({"cluster": {"name": "e2e", "num_workers": 2, "worker_cpus": 0.5,
                                 "load_poll_interval_s": 0.2, "engine": {"model": model}},
                     "router": {"served_model_name": "tiny-llama", "max_queue_per_worker": 8}})
    serve.run(app, name="yard", route_prefix="/")
    yield {"base_url": f"http://127.0.0.1:{port}", "grpc_target": f"127.0.0.1:{grpc_port}", "model_dir": model}
    serve.shutdown()
    manager = ray_local.get_actor("yard-manager-e2e", namespace="yard")
    ray_local.get(manager.shutdown.remote())
    ray_local.kill(manager)
