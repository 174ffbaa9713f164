"""The dashboards and alerts we ship, against a real Prometheus (Debian's package,
unpacked by tests/debian_tools.py) scraping the running e2e cluster under a short
load that includes prefix-cache hits, a refused request and a killed worker, and a
prefill/decode cluster of its own that hands requests over (the P/D row).

`promtool check rules` passes on the alert rules; every PromQL expression in the
Grafana dashboard and in the rules is evaluated through Prometheus' HTTP API and
returns data (alerts with their comparisons made `bool`, so that they answer
whether or not they fire); every metric any of them names is exported and
documented in docs/metrics.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from conditions import wait_until
from debian_tools import tool
from pd_cluster import pd_application

from cluster.serving import free_port
from workers import SamplingParams
from workers.engine.block_manager import chain_hash
from workers.engine.config import EngineConfig
from workers.events import ACTOR_NAMESPACE, WorkerRequest, worker_actor_name
from workers.worker import Worker
from workers.worker_config import WorkerConfig

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "kustomize" / "monitoring"
METRICS_DOC = (REPO / "docs" / "metrics.md").read_text()

# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "rate", "irate", "increase", "histogram_quantile", "vector", "scalar",
    "clamp_min", "clamp_max", "abs", "absent", "time", "offset", "topk", "bottomk",
}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def rule_groups() -> dict[str, Any]:
    return {"groups": yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())["spec"]["groups"]}


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r]


def outside_selectors(expr: str) -> str:
    """The expression with label matchers ({...}), ranges ([...]) and grouping labels
    (by/without (...)) blanked out: what is left names metrics and functions."""
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    return re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)


def metric_names(expr: str) -> set[str]:
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", outside_selectors(expr)))
    return words - PROMQL_WORDS


def as_bool(expr: str) -> str:
    """`a > 0.95` as `a > bool 0.95`: a 0 or 1 for every series instead of only the
    firing ones. Comparisons inside label matchers are left alone."""
    parts = re.split(r"(\{[^}]*\})", expr)
    ops = r"(==|!=|>=|<=|>|<)(?!\s*bool)"
    return "".join(p if p.startswith("{") else re.sub(ops, r"\1 bool", p) for p in parts)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def wait_for(self, expr: str, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(1)

    def values(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Each series' value, by its labels."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(expr)}

    def rose(self, expr: str, before: dict[tuple[tuple[str, str], ...], float]) -> bool:
        """A series of `expr` is above its value in `before` (a new one above 0)."""
        return any(v > before.get(labels, 0.0) for labels, v in self.values(expr).items())



@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "yard-rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups()))
    return path


@pytest.fixture(scope="module")
def prometheus(metrics_port, rules_file, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(rules_file)],
              "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "w")
    server = subprocess.Popen([str(tool("prometheus")), f"--config.file={work / 'prometheus.yml'}",
                               f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield Prometheus(url)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def send_load(serve_app: dict[str, Any], ray_local: Any, prometheus: "Prometheus") -> None:
    """Completions (a shared 40-token prefix, so the prefix-aware policy predicts
    hits and workers realize them), one request refused before dispatch, and a
    worker killed and replaced."""
    client = openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)
    shared = list(range(100, 140))
    manager = ray_local.get_actor("yard-manager-e2e", namespace="yard")

    def complete(i: int) -> None:
        client.completions.create(model="tiny-llama", prompt=shared + [200 + i], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})

    # A hit is predicted once the router's snapshot shows the shared blocks cached:
    # wait until the manager's does (the router pulls it every 0.1 s), then send more.
    complete(0)
    head = chain_hash(None, tuple(shared[:16]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            s.load and head in s.load.cached_block_hashes for s in ray_local.get(manager.snapshot.remote())):
        time.sleep(0.05)
    for i in range(1, 16):
        complete(i)
    hits = ('sum(ray_yard_router_prefix_predicted_hit_blocks_total) > 0 and '
            'sum(ray_yard_router_prefix_realized_hit_blocks_total) > 0')
    assert prometheus.wait_for(hits, 90), "no prefix hit was predicted and realized"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    before = {s.worker_id for s in ray_local.get(manager.snapshot.remote())}
    ray_local.kill(ray_local.get(manager.snapshot.remote())[0].handle)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        snapshot = ray_local.get(manager.snapshot.remote())
        if len(snapshot) == 2 and all(s.healthy for s in snapshot) and {s.worker_id for s in snapshot} != before:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the killed worker was not replaced")
    for i in range(4):  # traffic on the replacement too
        client.completions.create(model="tiny-llama", prompt=shared + [300 + i], max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    migrate_one(client, ray_local, manager)


def migrate_one(client: openai.OpenAI, ray_local: Any, manager: Any) -> None:
    """A stream moved to the other worker mid-decode: the migration panels and the
    failing-migrations alert have data."""
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(lambda: "".join(
            c.choices[0].text for c in client.completions.create(
                model="tiny-llama", prompt="moving on", max_tokens=1800, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) if c.choices))
        result = None
        deadline = time.monotonic() + 60
        while (result is None or not result.committed) and time.monotonic() < deadline:
            busy = next((s for s in ray_local.get(manager.snapshot.remote())
                         if s.load and any(r.running for r in s.load.requests)), None)
            if busy is None:
                continue
            other = next(s for s in ray_local.get(manager.snapshot.remote()) if s.worker_id != busy.worker_id)
            rid = next(r.request_id for r in busy.load.requests if r.running)
            result = ray_local.get(manager.migrate.remote(rid, busy.worker_id, other.worker_id))
        assert result is not None and result.committed, result
        assert len(stream.result()) > 0


def total_outage(serve_app: dict[str, Any], ray_local: Any, prometheus: "Prometheus") -> list[dict[str, Any]]:
    """No worker takes requests (both draining): every request is a 503 counted as
    no_worker, and the failing-or-shed alert's condition holds. Returns what the
    alert's expression evaluated to; serving resumes afterwards."""
    client = openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)
    manager = ray_local.get_actor("yard-manager-e2e", namespace="yard")
    workers = [s.handle for s in ray_local.get(manager.snapshot.remote())]
    no_worker = 'ray_yard_router_requests_total{status="no_worker"}'

    def refused() -> bool:
        try:
            client.completions.create(model="tiny-llama", prompt="anyone there?", max_tokens=2)
        except openai.InternalServerError as e:
            assert e.status_code == 503, e
            return True
        return False

    # Another router's no_worker count (an earlier test's) must not stand for this one's.
    before = prometheus.values(no_worker)
    ray_local.get([w.set_draining.remote(True) for w in workers])
    try:
        deadline = time.monotonic() + 60
        while not refused() and time.monotonic() < deadline:  # until the router's snapshot shows it
            time.sleep(0.05)
        wait_until(lambda: prometheus.rose(no_worker, before), 90, "the outage's 503s counted as no_worker")
        for _ in range(10):  # an increase Prometheus sees, so that rate() is above 0
            assert refused()
        assert prometheus.wait_for(f"sum(increase({no_worker}[5m])) > 0", 90)
        alert = next(r for r in alert_rules() if r["alert"] == "YardRequestsFailingOrShed")
        return prometheus.query(alert["expr"])
    finally:
        ray_local.get([w.set_draining.remote(False) for w in workers])
        deadline = time.monotonic() + 60  # serving again before the next test
        while refused() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_promtool_checks_the_rules(rules_file):
    out = subprocess.run([str(tool("promtool")), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def disaggregated_load(serve_app: dict[str, Any], ray_local: Any, prometheus: "Prometheus") -> None:
    """Requests through a cluster of one prefill and one decode worker, prompts long
    enough that their KV streams over while they compute: the P/D row has data."""
    with pd_application(ray_local, serve_app, "pd-metrics", worker_cpus=0.25) as app:
        client = openai.OpenAI(base_url=app["base_url"], api_key="unused", max_retries=0)
        for i in range(6):
            client.completions.create(model="tiny-llama", prompt=f"request {i} " + "word " * 120, max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert prometheus.wait_for('ray_yard_worker_handoffs_total{outcome="committed"}', 90)
        assert prometheus.wait_for('ray_yard_worker_request_phase_seconds_count{phase="transfer"}', 60)
        assert prometheus.wait_for('ray_yard_worker_kv_transfer_hidden_seconds_total{reason="handoff"}', 60)


def start_worker(ray_local: Any, config: WorkerConfig) -> Any:
    """A worker actor beside the app. Its start (imports, model load) runs in the
    background, so the three below start side by side."""
    return ray_local.remote(Worker).options(num_cpus=0.25, name=worker_actor_name(config.worker_id),
                                            namespace=ACTOR_NAMESPACE).remote(config)


def run_requests(ray_local: Any, worker: Any, requests: list[WorkerRequest]) -> None:
    streams = [worker.generate.remote(request) for request in requests]
    for stream in streams:
        for ref in stream:
            ray_local.get(ref)


def expert_parallel_worker(make_model: Any) -> WorkerConfig:
    """A MoE worker with expert parallelism (the e2e models are dense)."""
    return WorkerConfig("w-experts", EngineConfig(
        model=str(make_model("tiny-moe-affinity")), kv_cache_memory_gib=0.25, tensor_parallel_size=2,
        expert_parallel_size=2, tp_cpus_per_rank=0.25))


def experts_row(ray_local: Any, worker: Any, prometheus: "Prometheus") -> None:
    """Requests through the MoE worker, then a live re-placement: the experts row has data."""
    run_requests(ray_local, worker, [WorkerRequest(f"moe-{i}", tuple(range(10 + i, 60 + i)),
                                                   SamplingParams(max_tokens=8)) for i in range(3)])
    assert prometheus.wait_for("ray_yard_worker_expert_dispatched_tokens_total", 60)
    ray_local.get(worker.replace_experts.remote("balanced"))
    assert prometheus.wait_for('ray_yard_worker_expert_replacements_total{outcome="done"}', 60)


def offloading_worker(make_model: Any) -> WorkerConfig:
    """A worker with two attention workers, decoding in two micro-batches."""
    return WorkerConfig("w-offload", EngineConfig(
        model=str(make_model("tiny-llama")), kv_cache_memory_gib=0.25,
        attention_offload={"workers": 2, "micro_batches": 2, "cpus_per_worker": 0.25}))


def offloading_row(ray_local: Any, worker: Any, prometheus: "Prometheus") -> None:
    run_requests(ray_local, worker, [WorkerRequest(f"off-{i}", tuple(range(10 + i, 40 + i)),
                                                   SamplingParams(max_tokens=16)) for i in range(4)])
    assert prometheus.wait_for('ray_yard_worker_offload_bytes_total{direction="in"}', 60)
    assert prometheus.wait_for("ray_yard_worker_offload_attention_seconds_total", 60)


def vllm_worker(make_model: Any) -> WorkerConfig:
    """A worker with vLLM's engine inside."""
    return WorkerConfig("w-vllm", EngineConfig(model=str(make_model("tiny-llama")), kv_cache_memory_gib=0.25,
                                               backend="vllm"))


def vllm_row(ray_local: Any, worker: Any, prometheus: "Prometheus") -> None:
    """The vLLM row (vLLM's own metrics) has data."""
    run_requests(ray_local, worker, [WorkerRequest(f"vllm-{i}", tuple(range(10 + i, 40 + i)),
                                                   SamplingParams(max_tokens=16)) for i in range(4)])
    assert prometheus.wait_for("ray_vllm_generation_tokens_total", 60)
    assert prometheus.wait_for("ray_vllm_inter_token_latency_seconds_count", 60)


def test_every_dashboard_and_alert_query_returns_data(serve_app, ray_local, prometheus, make_model):
    rows = [(expert_parallel_worker(make_model), experts_row), (offloading_worker(make_model), offloading_row),
            (vllm_worker(make_model), vllm_row)]
    workers = [start_worker(ray_local, config) for config, _ in rows]
    try:
        for worker, (_, row) in zip(workers, rows):
            row(ray_local, worker, prometheus)
        every_query_returns_data(serve_app, ray_local, prometheus)
    finally:  # alive until every query ran: their series must still be there
        ray_local.get([worker.shutdown.remote() for worker in workers])
        for worker in workers:
            ray_local.kill(worker)


def every_query_returns_data(serve_app: dict[str, Any], ray_local: Any, prometheus: "Prometheus") -> None:
    send_load(serve_app, ray_local, prometheus)
    disaggregated_load(serve_app, ray_local, prometheus)
    # Ray exports a few seconds after recording; rates need two scrapes after that.
    assert prometheus.wait_for('count_over_time(ray_yard_router_requests_total{status="ok"}[1m]) > 3', 90)
    assert prometheus.wait_for("ray_yard_cluster_worker_replacements_total", 60)
    assert prometheus.wait_for("ray_yard_router_prefix_realized_hit_blocks_total", 60)
    assert prometheus.wait_for("ray_yard_worker_migration_downtime_seconds_count", 60)
    assert prometheus.wait_for("ray_yard_cluster_migrations_total", 60)

    queries = dashboard_queries()
    assert len(queries) >= 20
    empty = [(title, expr) for title, expr in queries if not prometheus.query(expr)]
    assert not empty, f"dashboard queries without data: {empty}"

    for rule in alert_rules():
        assert prometheus.query(as_bool(rule["expr"])), f"alert {rule['alert']}: no data for {as_bool(rule['expr'])}"

    firing = total_outage(serve_app, ray_local, prometheus)
    assert firing and firing[0]["metric"]["model"] == "tiny-llama", firing

    names = set().union(*(metric_names(expr) for _, expr in queries),
                        *(metric_names(r["expr"]) for r in alert_rules()))
    assert names and all(n.startswith(("ray_yard_", "ray_vllm_")) for n in names), names
    for name in sorted(names):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{name}`" in METRICS_DOC or f"`{base}`" in METRICS_DOC, f"{name} is not in docs/metrics.md"
        assert prometheus.query(name), f"{name} is named by a query but not exported"


def test_query_checks_catch_a_metric_we_do_not_export(prometheus):
    """The checks above would fail on a dashboard naming a metric we don't export."""
    assert metric_names('sum by (worker) (rate(ray_yard_worker_no_such_metric_total{a!="b"}[5m]))') == \
        {"ray_yard_worker_no_such_metric_total"}
    assert not prometheus.query('sum by (worker) (rate(ray_yard_worker_no_such_metric_total[5m]))')
    assert as_bool('x{a!="1"} > 0.95 and y == 0') == 'x{a!="1"} > bool 0.95 and y == bool 0'
