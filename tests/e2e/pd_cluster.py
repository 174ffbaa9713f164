"""A prefill/decode application beside the e2e tests' own: its own cluster of one
prefill and one decode worker, behind a Serve application of its own."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def pd_application(ray_local: Any, serve_app: dict[str, Any], name: str,
                   worker_cpus: float) -> Iterator[dict[str, Any]]:
    """A Serve application at /NAME over a cluster of its own: one prefill worker (long
    prompts in chunks of 32 tokens, so their KV streams while they compute) and one
    decode worker. Removed, with its manager, on exit."""
    from ray import serve

    from router.app import build_app

    app = build_app({"cluster": {"name": name, "num_workers": 0, "worker_cpus": worker_cpus,
                                 "load_poll_interval_s": 0.1,
                                 "engine": {"model": serve_app["model_dir"], "max_model_len": serve_app["max_model_len"]},
                                 "pools": {"prefill": {"num_workers": 1, "engine": {"max_num_batched_tokens": 32}},
                                           "decode": {"num_workers": 1}}},
                     "router": {"served_model_name": "tiny-llama", "snapshot_interval_s": 0.05}})
    serve.run(app, name=name, route_prefix=f"/{name}")
    manager = ray_local.get_actor(f"yard-manager-{name}", namespace="yard")
    try:
        yield {"base_url": f"{serve_app['base_url']}/{name}/v1", "manager": manager}
    finally:
        serve.delete(name)
        ray_local.get(manager.shutdown.remote())
        ray_local.kill(manager)
