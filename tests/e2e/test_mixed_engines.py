"""One cluster, two engines: a pool of yard's workers and a pool of vLLM workers
(ClusterConfig.pools), through the router with the official `openai` client. Either
worker killed mid-stream, its streams go on on the other engine with no gap and no
repeat, and the manager replaces it with a worker of its own pool."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conditions import wait_until
from workers import LLM, SamplingParams

PROMPTS = [f"Mixed stream {i} goes on" for i in range(4)]
TOKENS = 400


@pytest.fixture(scope="module")
def mixed_app(ray_local, serve_app):
    """A third application over a cluster of its own ("e2e-mixed"): one yard worker
    (the "mixed" pool) and one vLLM worker (the "vllm" pool), the same model."""
    from ray import serve

    from router.app import build_app
    from tests.e2e.conftest import test_values

    values = test_values(serve_app["model_dir"])
    values["cluster"].update(name="e2e-mixed", num_workers=1,
                             pools={"vllm": {"num_workers": 1, "engine": {"backend": "vllm"}}})
    serve.run(build_app(values), name="mixed", route_prefix="/mixed")
    manager = ray_local.get_actor("yard-manager-e2e-mixed", namespace="yard")
    yield {"base_url": serve_app["base_url"] + "/mixed", "manager": manager}
    serve.delete("mixed")
    ray_local.get(manager.shutdown.remote())
    ray_local.kill(manager)


@pytest.fixture(scope="module")
def expected(serve_app):
    """Undisturbed greedy texts, from yard's engine in this process."""
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    return [o.text for o in LLM(model=serve_app["model_dir"], kv_cache_memory_gib=0.25).generate(PROMPTS, params)]


def backends(ray, manager) -> dict[str, list]:
    """The healthy, reporting workers by engine."""
    out: dict[str, list] = {"yard": [], "vllm": []}
    for s in ray.get(manager.snapshot.remote()):
        if s.healthy and s.load is not None:
            out[s.load.backend].append(s)
    return out


@pytest.mark.parametrize("victim", ["vllm", "yard"])
def test_a_killed_worker_goes_on_on_the_other_engine(ray_local, mixed_app, expected, victim):
    manager = mixed_app["manager"]
    wait_until(lambda: all(len(w) == 1 for w in backends(ray_local, manager).values()), 120,
               "one healthy worker of each engine")
    client = openai.OpenAI(base_url=mixed_app["base_url"] + "/v1", api_key="unused", max_retries=0)

    def stream(prompt: str) -> tuple[str, str]:
        chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        choices = [c.choices[0] for c in chunks if c.choices]
        return "".join(c.text for c in choices), choices[-1].finish_reason

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, p) for p in PROMPTS]
        serving = wait_until(lambda: next((s for s in backends(ray_local, manager)[victim]
                                           if s.load.num_running > 0), None), 60,
                             f"a stream running on the {victim} worker")
        ray_local.kill(serving.handle, no_restart=True)
        results = [f.result() for f in futures]
    assert results == [(text, "length") for text in expected]

    def replaced() -> bool:
        now = backends(ray_local, manager)
        ids = {s.worker_id for w in now.values() for s in w}
        return serving.worker_id not in ids and all(len(w) == 1 for w in now.values())
    wait_until(replaced, 120, f"the manager to replace the {victim} worker from its own pool")
    status = ray_local.get(manager.status.remote())
    assert status["pools"] == {"mixed": {"size": 1}, "vllm": {"size": 1}}
    assert sorted(w["pool"] for w in status["workers"]) == ["mixed", "vllm"]
