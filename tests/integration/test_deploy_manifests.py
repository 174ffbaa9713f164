"""deploy/: every manifest parses and kustomize builds the base, the monitoring and
every overlay; core Kubernetes objects (and the RayService's pod templates) validate
against Kubernetes' schemas; serveConfigV2 validates with Ray's Serve config schema
and names our app; each overlay's values make a valid cluster and router config that
fits the GPUs its pods ask for; the PodMonitor finds the pods' metrics port."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.32"


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to build deploy/kustomize")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def values_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (config_map,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("yard-values")]
    return yaml.safe_load(config_map["data"]["values.yaml"])


def test_every_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.json"))
    assert len(files) >= 10
    for path in files:
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else list(yaml.safe_load_all(path.read_text()))
        assert docs and all(d is not None for d in docs), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_against_kubernetes_schemas(overlay):
    import kubernetes_validate

    docs = kustomize(KUSTOMIZE / "overlays" / overlay)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "ConfigMap", "PodMonitor", "PrometheusRule", "RayService"]
    for doc in docs:
        if doc["apiVersion"] == "v1":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (rayservice,) = by_kind(docs, "RayService")
    for template in pod_templates(rayservice):  # the parts of the CRD that are core Kubernetes
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                                      "template": template}, K8S_VERSION, strict=True)
    service = rayservice["spec"]["serveService"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **service}, K8S_VERSION, strict=True)
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 9000}  # HTTP and gRPC


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_values_config_map_reaches_every_pod(overlay):
    docs = kustomize(KUSTOMIZE / "overlays" / overlay)
    (values,) = [d["metadata"]["name"] for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("yard-values-")]
    (rayservice,) = by_kind(docs, "RayService")
    for template in pod_templates(rayservice):
        names = [v["configMap"]["name"] for v in template["spec"]["volumes"] if "configMap" in v]
        assert names == [values]  # hash-suffixed: a values change rolls out a new cluster
        mounts = {m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"]}
        assert "/etc/yard" in mounts


def test_serve_config_validates_with_rays_schema_and_names_our_app():
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve_env import STREAMING_SERVE_ENV
    from router.app import APP_ARGS, build_app

    (rayservice,) = by_kind(kustomize(KUSTOMIZE / "base"), "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = config.applications
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is build_app  # (the e2e tests build it)
    assert set(app.args) <= APP_ARGS | {"values_file"} and app.args["values_file"] == "/etc/yard/values.yaml"
    assert [d.name for d in app.deployments] == ["router"]
    assert config.grpc_options.grpc_servicer_functions == ["router.grpc_stubs.add_YardServicer_to_server"]
    for template in pod_templates(rayservice):  # Serve's streaming settings, in every Ray process
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        assert {k: env.get(k) for k in STREAMING_SERVE_ENV} == STREAMING_SERVE_ENV
        # Router replicas run in any Ray process: every pod reads the API keys' Secret.
        assert env["YARD_API_KEYS"] == {"secretKeyRef": {"name": "yard-api-keys", "key": "keys", "optional": True}}


@pytest.mark.parametrize("overlay", ["../base"] + OVERLAYS)
def test_values_make_a_valid_cluster_that_fits_the_pods(overlay):
    from cluster.config import ClusterConfig
    from cluster.values import merge
    from router.config import RouterConfig

    docs = kustomize((KUSTOMIZE / "overlays" / overlay).resolve())
    (rayservice,) = by_kind(docs, "RayService")
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    merged = merge({k: v for k, v in args.items() if k != "values_file"}, values_of(docs))
    cluster = ClusterConfig.from_dict(merged["cluster"])
    RouterConfig(cluster_name=cluster.name, **merged["router"])
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    offered = {g["groupName"]: advertised(g) for g in groups}  # what each group's pods give Ray
    used = {name: 0.0 for name in offered}  # GPUs the workers take from each group
    for role, count in cluster.pool_sizes():  # mixed workers, prefill and decode pools, further pools
        engine = cluster.engine_for(role)
        bundles = cluster.worker_bundles(role)
        assert any(b.get("GPU", 0) for b in bundles) == (engine.device == "cuda")
        rank_gpus = sum(b.get("GPU", 0) for b in bundles[:engine.tensor_parallel_size])
        for bundle in bundles:  # each bundle fits one group's pods: its GPUs and resource labels
            fits = [name for name, pod in offered.items()
                    if all(pod.get(k, 0) >= v for k, v in bundle.items() if k != "CPU")]
            assert len(fits) == 1, f"{role} bundle {bundle}: fits groups {fits}, not exactly one"
            used[fits[0]] += count * bundle.get("GPU", 0)
            if bundle in bundles[:engine.tensor_parallel_size] and engine.placement_strategy.startswith("STRICT"):
                assert rank_gpus <= offered[fits[0]]["GPU"]  # the ranks of a worker share one pod
    for group in groups:
        assert used[group["groupName"]] <= group["replicas"] * offered[group["groupName"]]["GPU"], group["groupName"]


def advertised(group: dict[str, Any]) -> dict[str, float]:
    """A worker group's pods to Ray: GPUs (matching the pod's nvidia.com/gpu) and the
    custom resources of rayStartParams (KubeRay's quoted JSON string)."""
    (container,) = group["template"]["spec"]["containers"]
    pod_gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert int(group["rayStartParams"]["num-gpus"]) == pod_gpus  # Ray's count matches the pod's
    assert int(container["resources"]["requests"].get("nvidia.com/gpu", 0)) == pod_gpus
    labels = json.loads(json.loads(group["rayStartParams"]["resources"])) if "resources" in group["rayStartParams"] \
        else {}
    return {"GPU": pod_gpus, **labels}


def test_pod_monitor_finds_the_metrics_port():
    docs = kustomize(KUSTOMIZE / "overlays" / OVERLAYS[0])
    (monitor,) = by_kind(docs, "PodMonitor")
    (rayservice,) = by_kind(docs, "RayService")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for template in pod_templates(rayservice):
        assert wanted.items() <= template["metadata"]["labels"].items()
        (container,) = template["spec"]["containers"]
        assert ports <= {p["name"] for p in container["ports"] if p["containerPort"] == 8080}
    starts = [rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]] + \
        [g["rayStartParams"] for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert all(s["metrics-export-port"] == "8080" for s in starts)


def test_dashboard_config_map_carries_the_dashboard():
    docs = kustomize(KUSTOMIZE / "monitoring")
    (config_map,) = by_kind(docs, "ConfigMap")
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    shipped = json.loads((KUSTOMIZE / "monitoring" / "grafana-dashboard.json").read_text())
    assert json.loads(config_map["data"]["grafana-dashboard.json"]) == shipped


def test_dockerfile_copies_what_the_package_needs():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert lines[[i for i, ln in enumerate(lines) if ln and not ln.startswith("#")][0]].startswith("FROM python:3.11")
    copied = {src for ln in lines if ln.startswith("COPY ") for src in ln.split()[1:-1]}
    include = re.search(r'include = \[([^\]]*)\]', (REPO / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"(\w+)\*"', include):
        assert package in copied, f"the image does not get {package}/"
        assert (REPO / package).is_dir()
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert any("router.grpc_stubs" in ln for ln in lines)  # stubs generated at build
