"""`yard serve`, `yard status` and `yard demo`: start (or join) a Ray cluster, run the
cluster manager, the workers and the Serve application, and talk to it.

The serve config file is YAML with the sections `build_app` takes (cluster, router,
replicas) plus `http` and `grpc` (host and ports); docs/config.md lists every key.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from cluster.serve_env import STREAMING_SERVE_ENV, apply_serve_env, direct_ingress_env
from cluster.sizing import fit
from cluster.values import with_values_file
from router.config import MANAGER_NAMESPACE

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 9000
INGRESS_MODES = ("proxy", "direct")
APP_NAME = "yard"
GRPC_SERVICER = "router.grpc_stubs.add_YardServicer_to_server"
DEPLOY_TIMEOUT_S = 300.0  # the router replicas start in seconds; longer means Ray cannot place them


def load_serve_config(path: Optional[str], model: Optional[str], workers: Optional[int],
                      http_port: Optional[int], grpc_port: Optional[int], host: Optional[str],
                      ingress: Optional[str] = None, backend: Optional[str] = None) -> dict[str, Any]:
    """The YAML file (if any) with the command line's overrides applied."""
    raw: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a serve config must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    cluster = raw.setdefault("cluster", {})
    engine = cluster.get("engine") or {}
    engine = cluster["engine"] = {"backend": engine} if isinstance(engine, str) else engine  # `engine: vllm`
    if model:
        engine["model"] = model
    if backend:
        engine["backend"] = backend
    if workers:
        cluster["num_workers"] = workers
    http = raw.setdefault("http", {})
    grpc = raw.setdefault("grpc", {})
    http.setdefault("host", host or "127.0.0.1")
    http["port"] = http_port or http.get("port", DEFAULT_HTTP_PORT)
    grpc["port"] = grpc_port or grpc.get("port", DEFAULT_GRPC_PORT)
    raw["ingress"] = ingress or raw.get("ingress", "proxy")
    if raw["ingress"] not in INGRESS_MODES:
        raise ValueError(f"ingress must be one of {list(INGRESS_MODES)}, got {raw['ingress']!r}")
    if raw["ingress"] == "direct" and int(raw.get("replicas", 1)) != 1:
        raise ValueError(f"ingress 'direct' serves from one router replica per node (its ports are fixed); "
                         f"got replicas={raw['replicas']!r}")
    return raw


def connect_ray(serve_env: Optional[dict[str, str]] = None) -> bool:
    """Join the Ray cluster this machine belongs to (or the one RAY_ADDRESS names;
    `local` starts a new one), or start a local one. Returns whether it started Ray:
    only then does `serve_env` (and the streaming settings) reach Ray's processes."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    apply_serve_env(STREAMING_SERVE_ENV)
    os.environ.update(serve_env or {})
    address = os.environ.get("RAY_ADDRESS", "auto")
    if address != "local":
        try:
            ray.init(address=address, log_to_driver=False)
            return False
        except ConnectionError:
            if address != "auto":
                raise  # a named cluster that cannot be reached is an error, not a cue to start one
    ray.init(address="local", log_to_driver=False)
    return True


def start(config: dict[str, Any]) -> dict[str, str]:
    """Start Serve and the application; returns the endpoints."""
    from ray import serve
    from ray.serve import api as serve_api

    from router.app import APP_ARGS, build_app

    http, grpc = config["http"], config["grpc"]
    proxy_http, proxy_grpc = http["port"], grpc["port"]
    if config.get("ingress") == "direct":
        started = connect_ray(direct_ingress_env(http["port"], grpc["port"]))
        if not started and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
            raise RuntimeError("ingress 'direct' needs Ray started with cluster/serve_env.py's direct ingress "
                               "settings; this Ray was running already (set RAY_ADDRESS=local for a new one)")
        proxy_http, proxy_grpc = free_port(), free_port()  # Serve's proxy stays up, out of the way
    else:
        connect_ray()
    serve.start(http_options={"host": http["host"], "port": proxy_http},
                grpc_options={"port": proxy_grpc, "grpc_servicer_functions": [GRPC_SERVICER]})
    import ray

    app_args = {k: v for k, v in config.items() if k in APP_ARGS | {"values_file"}}
    app_args = fit(with_values_file(app_args), ray.cluster_resources().get("CPU", 0))
    serve_api._run(build_app(app_args), name=APP_NAME, route_prefix="/", _blocking=False)
    wait_until_running(APP_NAME, DEPLOY_TIMEOUT_S)
    return {"http": f"http://{http['host']}:{http['port']}/v1", "grpc": f"{http['host']}:{grpc['port']}"}


def wait_until_running(app_name: str, timeout_s: float) -> None:
    """Wait for the Serve application to run; raise, saying why, if it failed or is
    still not running after timeout_s (a replica Ray cannot place waits forever)."""
    import ray
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        state = getattr(app, "status", "NOT_STARTED")
        if state == "RUNNING":
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
            details = {name: d.message for name, d in (app.deployments if app else {}).items() if d.message}
            raise RuntimeError(f"the Serve application {app_name!r} is {state} after "
                               f"{timeout_s - max(0.0, deadline - time.monotonic()):.0f} s: {details or 'no message'}; "
                               f"Ray has {ray.available_resources().get('CPU', 0):g} CPUs free of "
                               f"{ray.cluster_resources().get('CPU', 0):g}")
        time.sleep(0.5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(config: dict[str, Any]) -> None:
    from ray import serve

    serve.shutdown()
    stop_cluster(config.get("cluster", {}).get("name", "yard"))


def stop_cluster(name: str) -> bool:
    """Stop the named cluster's manager and its workers; False if none runs."""
    import ray

    try:
        manager = ray.get_actor(f"yard-manager-{name}", namespace=MANAGER_NAMESPACE)
    except ValueError:
        return False
    ray.get(manager.shutdown.remote())
    ray.kill(manager)
    return True


def stop_command(cluster_name: str) -> int:
    connect_ray()
    if not stop_cluster(cluster_name):
        print(f"no yard cluster named {cluster_name!r} is running")
        return 1
    print(f"cluster {cluster_name!r} stopped: its manager and workers are gone")
    return 0


def serve_forever(config: dict[str, Any]) -> None:
    endpoints = start(config)
    print(f"yard is serving {config['cluster'].get('engine', {}).get('model', 'tiny-llama')}")
    print(f"  OpenAI HTTP: {endpoints['http']}")
    print(f"  gRPC:        {endpoints['grpc']} (service yard.v1.Yard)")
    print("Ctrl-C to stop.", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    stop(config)


def _manager(cluster_name: str) -> Any:
    """The running cluster's manager actor, or None (having said so)."""
    import ray

    connect_ray()
    try:
        return ray.get_actor(f"yard-manager-{cluster_name}", namespace=MANAGER_NAMESPACE)
    except ValueError:
        print(f"no yard cluster named {cluster_name!r} is running")
        return None


def print_status(cluster_name: str, as_json: bool = False) -> int:
    import ray

    manager = _manager(cluster_name)
    if manager is None:
        return 1
    status = ray.get(manager.status.remote())
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    restarted = " (its manager restarted and adopted the workers)" if status["restarted"] else ""
    print(f"cluster {status['cluster']}: {len(status['workers'])} workers, {status['replaced']} replaced{restarted}")
    print(f"{'worker':<24}{'role':<8}{'healthy':<9}{'draining':<10}{'running':>8}{'waiting':>8}"
          f"{'free/total blocks':>20}")
    for w in status["workers"]:
        blocks = f"{w['free_blocks']}/{w['total_blocks']}" if w["total_blocks"] is not None else "-"
        print(f"{w['id']:<24}{w['role']:<8}{str(w['healthy']):<9}{str(w['draining']):<10}{_dash(w['running']):>8}"
              f"{_dash(w['waiting']):>8}{blocks:>20}")
    migrations = status["migrations"]
    print(f"migrations in flight: {len(migrations['in_flight'])}")
    for m in migrations["in_flight"]:
        print(f"  {m['id']}: {m['request']} {m['from']} -> {m['to']} ({m['reason']}, {m['running_s']} s)")
    for t in migrations["totals"]:
        print(f"  {t['reason']:<9}{t['outcome']:<10}{t['count']:>8}")
    return 0


def drain(cluster_name: str, worker_id: Optional[str], timeout_s: float) -> int:
    """Move every request off the worker (None: every worker on this Ray node); returns
    0 once they are empty."""
    import ray

    manager = _manager(cluster_name)
    if manager is None:
        return 1
    try:
        if worker_id is None:
            results = ray.get(manager.drain_node.remote(ray.util.get_node_ip_address(), timeout_s))
        else:
            results = [ray.get(manager.drain.remote(worker_id, timeout_s))]
    except ray.exceptions.RayTaskError as e:
        raise ValueError(str(e.cause) if getattr(e, "cause", None) else str(e)) from e
    for r in results:
        if r["drained"]:
            print(f"worker {r['worker']} is drained")
        else:
            print(f"worker {r['worker']} still holds {r['remaining']} request(s) after {timeout_s:g} s")
    if not results:
        print("no worker of this cluster runs on this node")
    return 0 if all(r["drained"] for r in results) else 1


def _dash(value: Optional[int]) -> str:
    return "-" if value is None else str(value)


def demo(config: dict[str, Any]) -> None:
    """Start the cluster, send one request through each API, print both, stop."""
    import grpc
    import openai

    from router.grpc_stubs import load

    # Two workers and a router share a laptop's cores: ask Ray for half a CPU each.
    config["cluster"].setdefault("worker_cpus", 0.5)
    endpoints = start(config)
    try:
        client = openai.OpenAI(base_url=endpoints["http"], api_key="unused")
        reply = client.chat.completions.create(model=_model_name(config), max_tokens=24, temperature=0,
                                               messages=[{"role": "user", "content": "What is a KV cache?"}])
        print(f"HTTP  /v1/chat/completions -> {reply.choices[0].message.content!r}")
        stubs = load()
        with grpc.insecure_channel(endpoints["grpc"]) as channel:
            stub = stubs.pb2_grpc.YardStub(channel)
            sampling = stubs.pb2.SamplingParams(max_tokens=24, temperature=0)
            request = stubs.pb2.GenerateRequest(model=_model_name(config), text="The quick brown fox",
                                                sampling=sampling)
            text = "".join(r.text for r in stub.Generate(request, metadata=(("application", APP_NAME),)))
        print(f"gRPC  yard.v1.Yard/Generate -> {text!r}")
    finally:
        stop(config)
        time.sleep(0.5)


def _model_name(config: dict[str, Any]) -> str:
    router = config.get("router", {})
    return router.get("served_model_name") or config["cluster"].get("engine", {}).get("model", "tiny-llama")
