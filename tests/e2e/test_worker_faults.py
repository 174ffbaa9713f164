"""A worker killed mid-stream loses nothing: the client's text equals an undisturbed
run, and the manager replaces the worker."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
from conditions import wait_until

from workers import LLM, SamplingParams

PROMPT = "Once upon a time"
TOKENS = 600


def busy_worker(ray, manager, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for s in ray.get(manager.snapshot.remote()):
            if s.healthy and s.load and s.load.num_running > 0:
                return s
        time.sleep(0.02)
    raise AssertionError("no worker picked the request up")


def test_killed_worker_mid_stream_loses_nothing(ray_local, serve_app):
    expected = LLM(model=serve_app["model_dir"]).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True))[0].text
    client = openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)
    manager = ray_local.get_actor("yard-manager-e2e", namespace="yard")
    stream = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 5:
            victim = busy_worker(ray_local, manager)
            ray_local.kill(victim.handle, no_restart=True)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = ray_local.get(manager.snapshot.remote())
        if victim.worker_id not in {w.worker_id for w in workers} and sum(w.healthy for w in workers) == 2:
            break
        time.sleep(0.2)
    assert victim.worker_id not in {w.worker_id for w in workers}
    assert sum(w.healthy for w in workers) == 2


def healthy_workers(serve_app) -> int:
    """How many workers the router's snapshot shows able to take a request."""
    with urllib.request.urlopen(serve_app["base_url"] + "/health", timeout=10) as r:
        return json.load(r)["healthy_workers"]


def test_a_stream_whose_only_worker_died_waits_for_its_replacement(ray_local, serve_app):
    """The other worker drains (takes nothing new), then the busy one is killed: no
    worker is left to resume on, so the router waits (failover_wait_s) until the
    manager has started a replacement, and the stream goes on there, exactly."""
    expected = LLM(model=serve_app["model_dir"]).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True))[0].text
    client = openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    manager = ray_local.get_actor("yard-manager-e2e", namespace="yard")
    stream = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks, idle = [], None
    try:
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 5:
                victim = busy_worker(ray_local, manager)
                idle = next(s for s in ray_local.get(manager.snapshot.remote()) if s.worker_id != victim.worker_id)
                ray_local.get(idle.handle.set_draining.remote(True))
                # Once the router sees it draining, its only choice for a retry is a replacement.
                wait_until(lambda: healthy_workers(serve_app) == 1, 30, "the router seeing one worker draining")
                ray_local.kill(victim.handle, no_restart=True)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == expected
        assert chunks[-1].choices[0].finish_reason == "length"
        workers = ray_local.get(manager.snapshot.remote())
        assert victim.worker_id not in {w.worker_id for w in workers}
    finally:
        if idle is not None:
            ray_local.get(idle.handle.set_draining.remote(False))
    wait_until(lambda: healthy_workers(serve_app) == 2, 60, "both workers serving again, before the next test")
