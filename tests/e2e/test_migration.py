"""Live migration through the Serve app, with the official openai client streaming.

A second application ("mig" cluster, two workers) dispatches everything to one worker
(`flood`) while the balance policy moves requests to the other mid-decode. Every
stream must equal an undisturbed run of the offline engine, exactly, with max_tokens
tokens, and no KV block may be left behind. Then the flooded worker is drained under
32 streams: it empties, and every stream still ends exactly.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from conditions import wait_until
from workers import LLM, SamplingParams

MAX_TOKENS = 160
DRAIN_TOKENS = 300
SOURCE = "mig-w0"  # flood sends everything to the smallest worker id


@pytest.fixture(scope="module")
def mig_app(ray_local, serve_app):
    from ray import serve

    from router.app import build_app

    app = build_app({"cluster": {"name": "mig", "num_workers": 2, "worker_cpus": 0.5, "load_poll_interval_s": 0.1,
                                 "engine": {"model": serve_app["model_dir"], "kv_cache_memory_gib": 0.25},
                                 "migration": {"enabled": True, "interval_s": 0.1, "balance_threshold": 1.0,
                                               "max_in_per_worker": 4, "max_out_per_worker": 4,
                                               "request_cooldown_s": 600.0}},
                     "router": {"served_model_name": "tiny-llama", "policy": "flood", "snapshot_interval_s": 0.05}})
    serve.run(app, name="migration", route_prefix="/mig")
    manager = ray_local.get_actor("yard-manager-mig", namespace="yard")
    yield {"base_url": serve_app["base_url"] + "/mig/v1", "manager": manager, "model_dir": serve_app["model_dir"]}
    serve.delete("migration")
    ray_local.get(manager.shutdown.remote())
    ray_local.kill(manager)


CASES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0},
    "seeded": {"temperature": 0.9, "top_p": 0.9, "seed": 11},
    "penalties": {"temperature": 0.8, "seed": 5, "presence_penalty": 0.5, "frequency_penalty": 0.3},
    # The worker samples with logprobs on (the text must not change); the logprobs
    # themselves are compared across moves through gRPC (token ids, not texts).
    "logprobs": {"temperature": 0, "logprobs": 2},
}


@pytest.fixture(scope="module")
def offline(mig_app):
    return LLM(model=mig_app["model_dir"], kv_cache_memory_gib=0.25)


def reference(llm: LLM, prompts: list[str], case: dict[str, Any], max_tokens: int = MAX_TOKENS) -> list[str]:
    """The texts of undisturbed runs on the offline engine (seeded draws do not depend
    on the batch)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **case)
    return [out.text for out in llm.generate(prompts, params)]


def stream(base_url: str, prompt: str, case: dict[str, Any], max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    chunks = list(client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **case))
    choices = [c.choices[0] for c in chunks if c.choices]
    return {"text": "".join(c.text for c in choices), "finish": choices[-1].finish_reason,
            "usage": chunks[-1].usage}


def all_blocks_free(ray, manager) -> bool:
    loads = [s.load for s in ray.get(manager.snapshot.remote())]
    return all(l is not None and l.free_blocks == l.total_blocks and not l.requests for l in loads)


def committed(ray, manager, reason: str) -> int:
    migrations = ray.get(manager.status.remote())["migrations"]
    failed = [m for m in migrations["recent"] if m["outcome"] == "failed"]
    assert not failed, [m["error"] for m in failed]  # aborted is fine (the request ended first); failed is a bug here
    return sum(t["count"] for t in migrations["totals"] if t["reason"] == reason and t["outcome"] == "committed")


def test_balanced_streams_equal_an_undisturbed_run(ray_local, mig_app, offline):
    prompts = [f"Request {i} starts a story about" for i in range(8)]
    cases = [sorted(CASES)[i % len(CASES)] for i in range(8)]
    expected = [reference(offline, [p], CASES[c])[0] for p, c in zip(prompts, cases)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda pc: stream(mig_app["base_url"], pc[0], CASES[pc[1]]), zip(prompts, cases)))
    for got, want, case in zip(results, expected, cases):
        assert got["text"] == want, case
        assert got["finish"] == "length"
        assert got["usage"].completion_tokens == MAX_TOKENS
    manager = mig_app["manager"]
    assert committed(ray_local, manager, "balance") >= 1
    wait_until(lambda: all_blocks_free(ray_local, manager), 10, "every block free on both workers")


def test_stop_string_across_a_move(ray_local, mig_app, offline):
    prompt = "The stop string test begins"
    full = reference(offline, [prompt], CASES["greedy"])[0]
    stop = full[len(full) // 2: len(full) // 2 + 5]
    before = committed(ray_local, mig_app["manager"], "balance")
    with ThreadPoolExecutor(6) as pool:
        # Company on the flooded worker, so that balancing moves some of them.
        others = [pool.submit(stream, mig_app["base_url"], f"filler {i}", CASES["greedy"]) for i in range(5)]
        got = stream(mig_app["base_url"], prompt, {"temperature": 0, "stop": [stop]})
        for f in others:
            f.result()
    assert got["text"] == full[:full.index(stop)]
    assert got["finish"] == "stop"
    assert committed(ray_local, mig_app["manager"], "balance") > before


def test_balanced_grpc_streams_have_the_undisturbed_token_ids_and_logprobs(ray_local, mig_app, offline, serve_app):
    """Through gRPC, which returns token ids and logprobs: exact, every case, across moves."""
    import grpc

    from router.grpc_stubs import load

    stubs = load()
    pb2 = stubs.pb2
    before = committed(ray_local, mig_app["manager"], "balance")
    prompts = [f"gRPC request {i} tells" for i in range(8)]
    cases = [sorted(CASES)[i % len(CASES)] for i in range(8)]
    with grpc.insecure_channel(serve_app["grpc_target"]) as channel:
        yard = stubs.pb2_grpc.YardStub(channel)

        def generate(prompt_and_case: tuple[str, str]) -> list[Any]:
            prompt, case = prompt_and_case
            sampling = pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **CASES[case])
            return list(yard.Generate(pb2.GenerateRequest(model="tiny-llama", text=prompt, sampling=sampling),
                                      metadata=(("application", "migration"),), timeout=120))

        with ThreadPoolExecutor(len(prompts)) as pool:
            streams = list(pool.map(generate, zip(prompts, cases)))
    for prompt, case, responses in zip(prompts, cases, streams):
        want = offline.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **CASES[case]))[0]
        ids: list[int] = []
        for r in responses:
            assert r.start_index == len(ids), "gap or duplicate"
            ids.extend(r.token_ids)
        assert ids == want.token_ids, case
        assert "".join(r.text for r in responses) == want.text
        assert responses[-1].usage.completion_tokens == MAX_TOKENS
        if case == "logprobs":
            got = [(lp.token_id, [t.token_id for t in lp.top_logprobs]) for r in responses for lp in r.logprobs]
            assert got == [(t.token_id, [i for i, _ in t.top_logprobs]) for t in want.logprobs]
    assert committed(ray_local, mig_app["manager"], "balance") > before


def test_drain_under_32_streams_loses_nothing(ray_local, mig_app, offline):
    manager = mig_app["manager"]
    prompts = [f"Drained stream {i} says" for i in range(32)]
    expected = reference(offline, prompts, CASES["greedy"], DRAIN_TOKENS)
    with ThreadPoolExecutor(33) as pool:
        futures = [pool.submit(stream, mig_app["base_url"], p, CASES["greedy"], DRAIN_TOKENS) for p in prompts]
        wait_until(lambda: sum(
            s.load.num_running for s in ray_local.get(manager.snapshot.remote())
            if s.worker_id == SOURCE and s.load) >= 8, 30, "streams running on the flooded worker")
        drained = pool.submit(lambda: ray_local.get(manager.drain.remote(SOURCE, 120.0)))
        results = [f.result() for f in futures]
        assert drained.result() == {"worker": SOURCE, "drained": True, "remaining": 0}
    for got, want in zip(results, expected):
        assert got["text"] == want
        assert got["usage"].completion_tokens == DRAIN_TOKENS
    assert committed(ray_local, manager, "drain") >= 1
    wait_until(lambda: all_blocks_free(ray_local, manager), 10, "every block free on both workers")
    status = ray_local.get(manager.status.remote())
    assert status["migrations"]["in_flight"] == []
    assert [w["draining"] for w in status["workers"] if w["id"] == SOURCE] == [True]


def test_drain_of_an_unknown_worker_names_it(ray_local, mig_app):
    with pytest.raises(Exception, match=r"no worker 'nope' in cluster mig; workers: \['mig-w0', 'mig-w1'\]"):
        ray_local.get(mig_app["manager"].drain.remote("nope"))


def test_yard_drain_and_status_commands(ray_local, mig_app, capsys):
    from cluster.cli import main

    assert main(["drain", "nope", "--cluster", "mig", "--timeout", "1"]) == 2
    assert "no worker 'nope' in cluster mig" in capsys.readouterr().err
    assert main(["drain", SOURCE, "--cluster", "mig", "--timeout", "30"]) == 0  # drained already: returns at once
    assert capsys.readouterr().out == f"worker {SOURCE} is drained\n"
    assert main(["status", "--cluster", "mig", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {t["reason"] for t in status["migrations"]["totals"]} >= {"balance", "drain"}
    assert main(["status", "--cluster", "mig"]) == 0
    out = capsys.readouterr().out
    assert "migrations in flight: 0" in out and "drain    committed" in out


def test_yard_drain_this_node_drains_every_worker_here(ray_local, mig_app, capsys, tmp_path):
    """What a pod's preStop hook runs; the cluster name comes from the values file."""
    from cluster.cli import main

    values = tmp_path / "values.yaml"
    values.write_text("cluster:\n  name: mig\n")
    assert main(["drain", "--this-node", "--values", str(values), "--timeout", "60"]) == 0
    assert capsys.readouterr().out == "worker mig-w0 is drained\nworker mig-w1 is drained\n"
    status = ray_local.get(mig_app["manager"].status.remote())
    assert [w["draining"] for w in status["workers"]] == [True, True]
