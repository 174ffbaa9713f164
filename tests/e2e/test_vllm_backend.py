"""A cluster whose workers run vLLM's engine, through the router with the official
`openai` client: vLLM's own greedy output, streamed and not; bad input answered
exactly as by the cluster of yard's engine; the balance rule moving streams with
their KV; a drain that moves streams and loses nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conditions import wait_until
from tests.e2e.test_load_and_bad_input import post
from tests.e2e.test_migration import committed
from tests.integration.vllm_reference import same_text, vllm_generate_soon
from workers.models.tokenizer import encode_prompt, load_tokenizer

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "KV"]
TOKENS = 40
DRAINED = [f"Drained vLLM stream {i} says" for i in range(8)]
DRAIN_TOKENS = 1000  # long enough to outlast the balance moves that come first (the app floods w0)
BALANCED = [f"Balanced vLLM stream {i} tells of" for i in range(4)]
BALANCE_TOKENS = 400


@pytest.fixture(scope="module")
def client(vllm_app):
    return openai.OpenAI(base_url=vllm_app["base_url"] + "/v1", api_key="unused", max_retries=0)


ASKED = {"completions": (PROMPTS, TOKENS), "balance": (BALANCED, BALANCE_TOKENS), "drain": (DRAINED, DRAIN_TOKENS)}


@pytest.fixture(scope="module", autouse=True)
def offline_soon(serve_app, tmp_path_factory):
    """vLLM's offline LLM on every prompt of this module, as the router tokenizes
    them, in one vLLM start, started before the app's workers (autouse fixtures come
    first), which take as long to start."""
    tokenizer = load_tokenizer(serve_app["model_dir"])
    prompts = [encode_prompt(tokenizer, p) for texts, _ in ASKED.values() for p in texts]
    lengths = [n for texts, n in ASKED.values() for _ in texts]
    return vllm_generate_soon(serve_app["model_dir"], prompts, lengths, None, tmp_path_factory.mktemp("vllm-e2e"))


@pytest.fixture(scope="module")
def offline(offline_soon) -> dict[str, list[dict]]:
    """By test, one dict per prompt."""
    out = iter(offline_soon.result(timeout=600))
    return {name: [next(out) for _ in texts] for name, (texts, _) in ASKED.items()}


@pytest.fixture(scope="module")
def expected(offline):
    return offline["completions"]


def test_completions_equal_vllm_offline(client, expected):
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert same_text(got.choices[0].text, want["text"])
        assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == TOKENS


def test_streamed_completions_equal_vllm_offline(client, expected):
    for prompt, want in zip(PROMPTS, expected):
        chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=TOKENS,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert same_text("".join(c.choices[0].text for c in chunks if c.choices), want["text"])
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


BAD = [
    {"model": "tiny-llama", "prompt": "x", "top_p": 0},
    {"model": "tiny-llama", "prompt": [1, 10**6]},
    {"model": "tiny-llama", "prompt": [5] * 1920},  # max_model_len is 1920: no room for output
    {"model": "tiny-llama", "prompt": "x", "max_tokens": 0},
    {"model": "tiny-llama", "prompt": "x", "logprobs": 21},
    {"model": "tiny-llama", "prompt": "x", "stop": [""]},
    {"model": "other", "prompt": "x"},
]


def test_bad_input_is_answered_as_by_yards_engine(serve_app, vllm_app):
    for body in BAD:
        code, _, vllm_error = post(vllm_app["base_url"], body)
        want_code, _, yard_error = post(serve_app["base_url"], body)
        assert code == want_code and code >= 400, body
        assert vllm_error == yard_error, body


def stream_text(client, prompt: str, max_tokens: int) -> str:
    chunks = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_balance_moves_vllm_streams_with_their_kv(ray_local, vllm_app, client, offline):
    """The router sends every stream to the first worker; the balance rule moves some
    to the second, each by vLLM's handover: its KV goes along (none is recomputed),
    and every text equals vLLM's offline one."""
    manager = vllm_app["manager"]
    expected = offline["balance"]
    before = committed(ray_local, manager, "balance")
    with ThreadPoolExecutor(len(BALANCED)) as pool:
        texts = list(pool.map(lambda p: stream_text(client, p, BALANCE_TOKENS), BALANCED))
    assert all(same_text(got, want["text"]) for got, want in zip(texts, expected, strict=True))
    assert committed(ray_local, manager, "balance") > before
    moves = [m for m in ray_local.get(manager.status.remote())["migrations"]["recent"] if m["reason"] == "balance"]
    assert moves and all(m["from"] == "e2e-vllm-w0" and m["to"] == "e2e-vllm-w1" for m in moves), moves
    assert all(m["stages"] >= 1 and m["blocks"] >= 1 for m in moves if m["outcome"] == "committed"), moves


def test_drain_moves_vllm_streams_by_recompute_and_loses_nothing(ray_local, vllm_app, client, offline):
    manager = vllm_app["manager"]
    expected = offline["drain"]

    def busiest() -> str:
        """Once every stream runs: the worker with the most, at least half of them. The
        balance rule has at most max_out_per_worker (2) of those in flight when the
        drain begins, and none after (a draining worker is the drain's): the drain
        has some left to move, whichever way balance went."""
        loads = [s.load for s in ray_local.get(manager.snapshot.remote()) if s.load is not None]
        top = max(loads, key=lambda l: l.num_running)
        return sum(l.num_running for l in loads) == len(DRAINED) and top.worker_id

    with ThreadPoolExecutor(len(DRAINED)) as pool:
        futures = [pool.submit(stream_text, client, p, DRAIN_TOKENS) for p in DRAINED]
        source = wait_until(busiest, 60, "streams running on a vLLM worker")
        drained = ray_local.get(manager.drain.remote(source, 120.0))
        texts = [f.result() for f in futures]
    assert drained == {"worker": source, "drained": True, "remaining": 0}
    assert all(same_text(got, want["text"]) for got, want in zip(texts, expected, strict=True))
    recent = ray_local.get(manager.status.remote())["migrations"]["recent"]
    assert committed(ray_local, manager, "drain") >= 1, recent
    # Requests that balance moved away are not ordered again from the drained worker's
    # older report (cluster/departures.py): no drain order finds its request gone.
    assert not [m for m in recent if m["reason"] == "drain" and "not_here" in (m["error"] or "")], recent
