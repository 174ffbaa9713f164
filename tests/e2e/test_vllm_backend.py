"""A cluster whose worker runs vLLM's engine, through the router with the official
`openai` client: vLLM's own greedy output, streamed and not, and bad input answered
exactly as by the cluster of yard's engine."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.test_load_and_bad_input import post
from tests.integration.vllm_reference import vllm_generate
from workers.models.tokenizer import encode_prompt, load_tokenizer

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "KV"]
TOKENS = 40


@pytest.fixture(scope="module")
def client(vllm_app):
    return openai.OpenAI(base_url=vllm_app["base_url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def expected(vllm_app, tmp_path_factory):
    """vLLM's offline LLM on the prompts as the router tokenizes them."""
    tokenizer = load_tokenizer(vllm_app["model_dir"])
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    return vllm_generate(vllm_app["model_dir"], ids, TOKENS, None, tmp_path_factory.mktemp("vllm-e2e"))


def test_completions_equal_vllm_offline(client, expected):
    for prompt, want in zip(PROMPTS, expected):
        got = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=TOKENS, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want["text"]
        assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == TOKENS


def test_streamed_completions_equal_vllm_offline(client, expected):
    for prompt, want in zip(PROMPTS, expected):
        chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=TOKENS,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
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
