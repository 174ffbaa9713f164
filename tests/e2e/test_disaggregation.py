"""Prefill/decode disaggregation through the official openai client: a cluster of one
prefill and one decode worker gives exactly the colocated cluster's outputs, greedy
and seeded, streamed and whole, for short, long (chunked) and prefix-sharing prompts.
Every request is prefilled on the prefill worker and decoded on the decode worker,
which never computes a prompt; afterwards neither holds a KV block."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import openai
import pytest
from pd_cluster import pd_application
from conditions import wait_until


MAX_TOKENS = 96
CASES: dict[str, dict[str, Any]] = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.9, "seed": 7}}
SHARED = "A long shared system preamble that several requests begin with, " * 6


@pytest.fixture(scope="module")
def pd_app(ray_local, serve_app):
    with pd_application(ray_local, serve_app, "pd", worker_cpus=0.5) as app:
        yield app


def prompts() -> list[str]:
    return ["Hi", "Tell me about the river and the old mill by the bridge",
            "word " * 300,  # many chunks of prefill
            SHARED + "then asks one thing", SHARED + "then asks another"]


def complete(base_url: str, prompt: str, case: str, stream: bool) -> tuple[str, str, int]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    kwargs = dict(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True},
                  **CASES[case])
    if not stream:
        reply = client.completions.create(**kwargs)
        return reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    choices = [c.choices[0] for c in chunks if c.choices]
    return "".join(c.text for c in choices), choices[-1].finish_reason, chunks[-1].usage.completion_tokens


def engine_stats(ray, manager) -> dict[str, Any]:
    """role → (its engine's stats, its load report), read in the worker actor."""
    def stats(worker: Any) -> Any:  # a local function travels by value
        return worker.engine.stats()

    return {s.role: (ray.get(s.handle.__ray_call__.remote(stats)), s.load) for s in ray.get(manager.snapshot.remote())}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_pd_equals_colocated_and_the_decode_worker_never_prefills(ray_local, serve_app, pd_app, stream):
    colocated = serve_app["base_url"] + "/v1"
    before = engine_stats(ray_local, pd_app["manager"])
    work = [(p, c) for c in CASES for p in prompts()]
    with ThreadPoolExecutor(1) as pool:  # one at a time: batches alike on both sides
        got = list(pool.map(lambda pc: complete(pd_app["base_url"], pc[0], pc[1], stream), work))
        want = list(pool.map(lambda pc: complete(colocated, pc[0], pc[1], stream), work))
    assert got == want
    assert all(finish == "length" and n == MAX_TOKENS for _, finish, n in got)

    after = engine_stats(ray_local, pd_app["manager"])
    (prefill, _), (decode, _) = after["prefill"], after["decode"]
    moved = decode.num_migrated_in - before["decode"][0].num_migrated_in
    assert moved == prefill.num_migrated_out - before["prefill"][0].num_migrated_out == len(work)
    assert decode.prompt_tokens == 0  # no request was ever admitted there with its prompt
    # Every token the decode worker computed is one it then decoded from: no prompt
    # was recomputed there.
    assert decode.computed_tokens == decode.generation_tokens
    assert prefill.generation_tokens - before["prefill"][0].generation_tokens >= len(work)  # the first tokens


def test_the_decider_sends_short_or_cached_prompts_straight_to_a_decode_worker(ray_local, serve_app, pd_app):
    """A second router over the same pools, with the decider on (16 uncached tokens):
    a short prompt skips the prefill hop, a long new one does not; outputs stay exact."""
    from ray import serve

    from router.app import Router
    from router.config import RouterConfig

    config = RouterConfig(model=serve_app["model_dir"], served_model_name="tiny-llama", cluster_name="pd",
                          decider_max_uncached_tokens=16)
    serve.run(Router.options(name="router").bind(config), name="pd-decider", route_prefix="/pd-decider")
    try:
        base_url = serve_app["base_url"] + "/pd-decider/v1"
        colocated = serve_app["base_url"] + "/v1"
        # A prompt the decode worker has seen (its KV came with a handoff) is cached
        # there and would go direct too: the long one here is new.
        for prompt, direct in (("Hi", True), ("river " * 300, False)):
            before = engine_stats(ray_local, pd_app["manager"])["decode"][0]
            assert complete(base_url, prompt, "greedy", True) == complete(colocated, prompt, "greedy", True)
            after = engine_stats(ray_local, pd_app["manager"])["decode"][0]
            assert (after.prompt_tokens > before.prompt_tokens) == direct, prompt
            assert after.num_migrated_in - before.num_migrated_in == (0 if direct else 1), prompt
    finally:
        serve.delete("pd-decider")


@pytest.mark.parametrize("victim", ["prefill", "decode"])
def test_a_worker_of_either_pool_killed_mid_stream_loses_nothing(ray_local, serve_app, pd_app, victim):
    """The prefill worker killed at the first token (its handoff may be under way), or
    the decode worker killed once the request runs there: the client's text equals
    the colocated cluster's, the pool is refilled, and no worker holds a block."""
    manager, prompt = pd_app["manager"], f"A story that the {victim} worker will not finish"
    # Each victim's run stands alone: the pools as they were, whatever ran before.
    wait_until(lambda: both_pools_serving_and_free(ray_local, manager), 120, "both pools serving, every block free")
    want = complete(serve_app["base_url"] + "/v1", prompt, "greedy", True)
    client = openai.OpenAI(base_url=pd_app["base_url"], api_key="unused", max_retries=0, timeout=120)
    by_role = {s.role: s for s in ray_local.get(manager.snapshot.remote())}
    chunks = []
    for chunk in client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        chunks.append(chunk)
        if len(chunks) == 1 and victim == "prefill":
            ray_local.kill(by_role["prefill"].handle, no_restart=True)
        if len(chunks) == 1 and victim == "decode":
            wait_until(lambda: ray_local.get(by_role["decode"].handle.load.remote()).num_running, 30,
                       "the request on the decode worker")
            ray_local.kill(by_role["decode"].handle, no_restart=True)
    choices = [c.choices[0] for c in chunks if c.choices]
    assert ("".join(c.text for c in choices), choices[-1].finish_reason, chunks[-1].usage.completion_tokens) == want

    def refilled_and_free() -> bool:
        gone = by_role[victim].worker_id
        return both_pools_serving_and_free(ray_local, manager, gone)
    wait_until(refilled_and_free, 120, f"a new {victim} worker, and every block free")


def both_pools_serving_and_free(ray_local: Any, manager: Any, gone: Optional[str] = None) -> bool:
    """One healthy worker in each pool, none of them `gone`, and no block held."""
    workers = ray_local.get(manager.snapshot.remote())
    return (sorted(s.role for s in workers if s.healthy) == ["decode", "prefill"]
            and gone not in {s.worker_id for s in workers}
            and all(s.load is not None and s.load.free_blocks == s.load.total_blocks and not s.load.requests
                    for s in workers))
