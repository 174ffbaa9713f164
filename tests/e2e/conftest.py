"""One Serve application for the e2e tests: the RayService's serveConfigV2
(deploy/kustomize/base/rayservice.yaml), deployed the way `serve run config.yaml`
deploys it, with test values (the tiny model, two workers) in its values file and
HTTP and gRPC on free loopback ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.serving import free_port

REPO = Path(__file__).resolve().parents[2]
RAYSERVICE = REPO / "deploy" / "kustomize" / "base" / "rayservice.yaml"



MAX_MODEL_LEN = 1920


def serve_config() -> dict[str, Any]:
    """serveConfigV2 of the RayService we ship, parsed."""
    return yaml.safe_load(yaml.safe_load(RAYSERVICE.read_text())["spec"]["serveConfigV2"])


def test_values(model: str) -> dict[str, Any]:
    # Small enough for 2 cores; 8 queued per worker so that a burst sheds with 429;
    # a max_model_len under the model's 2048, which the router must learn from the workers.
    return {"cluster": {"name": "e2e", "num_workers": 2, "worker_cpus": 0.5, "gpus_per_rank": 0,
                        "load_poll_interval_s": 0.2, "engine": {"model": model, "max_model_len": MAX_MODEL_LEN}},
            "router": {"served_model_name": "tiny-llama", "max_queue_per_worker": 8},
            "replicas": 1}


@pytest.fixture(scope="session")
def serve_app(ray_local, make_model, tmp_path_factory):
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    model = str(make_model("tiny-llama"))
    values = tmp_path_factory.mktemp("values") / "values.yaml"
    values.write_text(yaml.safe_dump(test_values(model)))
    raw = serve_config()
    port, grpc_port = free_port(), free_port()
    raw["http_options"].update(host="127.0.0.1", port=port)
    raw["grpc_options"]["port"] = grpc_port
    (app,) = raw["applications"]
    app["args"]["values_file"] = str(values)
    config = ServeDeploySchema.model_validate(raw)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location,
                                   grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    client.deploy_apps(config, _blocking=True)
    yield {"base_url": f"http://127.0.0.1:{port}", "grpc_target": f"127.0.0.1:{grpc_port}", "model_dir": model,
           "app_name": app["name"], "max_model_len": MAX_MODEL_LEN, "app_args": app["args"]}
    serve.shutdown()
    manager = ray_local.get_actor("yard-manager-e2e", namespace="yard")
    ray_local.get(manager.shutdown.remote())
    ray_local.kill(manager)


@pytest.fixture(scope="session")
def secure_app(ray_local, serve_app, tmp_path_factory):
    """A second application over the e2e cluster: API keys (team-key; boss-key may
    set priority) and per-request limits (64 prompt tokens, 32 output tokens)."""
    from ray import serve

    from router.app import build_app

    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("# one key per line, then its grants\nteam-key\nboss-key priority\n")
    args = serve_app["app_args"]
    router = {**args.get("router", {}), "api_keys_file": str(keys), "max_body_bytes": 4096,
              "max_prompt_tokens": 64, "max_completion_tokens": 32}
    serve.run(build_app({**args, "router": router}), name="secure", route_prefix="/secure")
    yield {"base_url": serve_app["base_url"] + "/secure", "grpc_target": serve_app["grpc_target"]}
    serve.delete("secure")


@pytest.fixture(scope="module")
def vllm_app(ray_local, serve_app, tmp_path_factory):
    """A second application over a cluster of its own ("e2e-vllm"): two workers with
    vLLM's engine inside, the same model as the e2e app. Its router floods the first
    worker and the balance rule moves streams to the other, as in test_migration's
    app. Module scope: its workers would otherwise idle beside every later test."""
    from ray import serve

    from router.app import build_app

    values = test_values(serve_app["model_dir"])
    values["cluster"].update(name="e2e-vllm", num_workers=2, load_poll_interval_s=0.1,
                             migration={"enabled": True, "interval_s": 0.1, "balance_threshold": 1.0,
                                        "max_in_per_worker": 2, "max_out_per_worker": 2,
                                        "request_cooldown_s": 600.0})
    values["cluster"]["engine"]["backend"] = "vllm"
    values["router"].update(policy="flood", snapshot_interval_s=0.05)
    serve.run(build_app(values), name="vllm", route_prefix="/vllm")
    manager = ray_local.get_actor("yard-manager-e2e-vllm", namespace="yard")
    yield {"base_url": serve_app["base_url"] + "/vllm", "model_dir": serve_app["model_dir"], "manager": manager}
    serve.delete("vllm")
    ray_local.get(manager.shutdown.remote())
    ray_local.kill(manager)
