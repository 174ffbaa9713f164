"""Metrics scraped from Ray's Prometheus endpoint match the traffic sent."""

from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

REQUESTS, TOKENS = 4, 8


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == want for k, want in labels.items()))


OK = ("ray_yard_router_requests_total", (("status", "ok"),))
REFUSED = ("ray_yard_router_requests_total", (("status", "invalid_request"),))
DISPATCHED = ("ray_yard_router_dispatch_decisions_total", (("policy", "prefix_aware"),))
TTFT = ("ray_yard_router_time_to_first_token_seconds_count", ())
E2E = ("ray_yard_router_e2e_latency_seconds_count", ())
GENERATED = ("ray_yard_worker_generation_tokens_total", ())


def test_metrics_match_traffic(serve_app, metrics_port):
    client = openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)
    client.completions.create(model="tiny-llama", prompt="warm", max_tokens=1)
    time.sleep(12)  # let every metric that exists export once, so the baseline is settled
    before = scrape(metrics_port)
    for i in range(REQUESTS):
        client.completions.create(model="tiny-llama", prompt=f"count {i}", max_tokens=TOKENS,
                                  temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(openai.NotFoundError):  # refused before dispatch: counted, not timed
        client.completions.create(model="no-such-model", prompt="x", max_tokens=TOKENS)
    expected = {OK: REQUESTS, REFUSED: 1, DISPATCHED: REQUESTS, TTFT: REQUESTS, E2E: REQUESTS,
                GENERATED: REQUESTS * TOKENS}
    deadline = time.monotonic() + 40
    while True:
        after = scrape(metrics_port)
        got = {(name, labels): total(after, name, **dict(labels)) - total(before, name, **dict(labels))
               for name, labels in expected}
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == expected
    assert total(after, "ray_yard_worker_kv_blocks_total") > 0
    assert total(after, "ray_yard_router_requests_in_flight") == 0
