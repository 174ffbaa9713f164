"""The OpenAI-compatible HTTP API through Ray Serve, with the official client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from workers import LLM, SamplingParams


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(serve_app):
    return LLM(model=serve_app["model_dir"])


def test_completion_matches_offline_engine(client, offline):
    expected = offline.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=20,
                                                                      ignore_eos=True))[0]
    got = client.completions.create(model="tiny-llama", prompt="The quick brown fox", max_tokens=20,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == expected.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 20 and got.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streaming_chat_with_usage_matches_offline(client, offline):
    messages = [{"role": "user", "content": "What is a KV cache?"}]
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_completion_logprobs_whole_and_streamed_match_offline(client, offline):
    want = offline.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                  logprobs=2))[0]
    token = lambda i: offline.tokenizer.decode([i])  # noqa: E731
    tokens = [token(t.token_id) for t in want.logprobs]
    top = [{token(t.token_id): t.logprob, **{token(i): lp for i, lp in t.top_logprobs}} for t in want.logprobs]
    args = dict(model="tiny-llama", prompt="The quick brown fox", max_tokens=12, temperature=0, logprobs=2,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0]
    assert whole.text == want.text
    assert whole.logprobs.tokens == tokens
    assert whole.logprobs.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert [set(d) for d in whole.logprobs.top_logprobs] == [set(d) for d in top]
    assert whole.logprobs.text_offset[0] == 0
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **args) if c.choices]
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert streamed == tokens and "".join(c.text for c in chunks) == want.text


def test_chat_logprobs_with_top_alternatives_match_offline(client, offline):
    messages = [{"role": "user", "content": "What is a KV cache?"}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3))[0]
    token = lambda i: offline.tokenizer.decode([i])  # noqa: E731
    args = dict(model="tiny-llama", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                top_logprobs=3, extra_body={"ignore_eos": True})
    content = client.chat.completions.create(**args).choices[0].logprobs.content
    assert [c.token for c in content] == [token(t.token_id) for t in want.logprobs]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert [[a.token for a in c.top_logprobs] for c in content] == \
        [[token(i) for i, _ in t.top_logprobs] for t in want.logprobs]
    assert all(c.bytes == list(c.token.encode()) for c in content)
    streamed = [c for chunk in client.chat.completions.create(stream=True, **args) if chunk.choices
                and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [token(t.token_id) for t in want.logprobs]


def test_n_seeded_choices_each_match_an_offline_run_with_its_seed(client, offline):
    prompt = "Once there was a cache that " * 6  # a few full blocks, shared by the choices
    got = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0.9, seed=7,
                                    n=3, extra_body={"ignore_eos": True})
    want = [offline.generate(prompt, SamplingParams(temperature=0.9, seed=7 + i, max_tokens=10,
                                                    ignore_eos=True))[0] for i in range(3)]
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert len({c.text for c in got.choices}) > 1  # their own seeds: not one text three times
    assert got.usage.prompt_tokens == len(want[0].prompt_token_ids) and got.usage.completion_tokens == 30


def test_n_streamed_chat_choices_each_equal_the_greedy_run(client, offline):
    messages = [{"role": "user", "content": "Name two caches."}]
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].text
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, temperature=0,
                                                 n=2, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    texts = {0: "", 1: ""}
    finished = []
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.append((c.index, c.finish_reason))
    assert texts == {0: expected, 1: expected}
    assert sorted(finished) == [(0, "length"), (1, "length")]
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_models_and_health(serve_app, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    with urllib.request.urlopen(serve_app["base_url"] + "/health") as r:
        assert json.loads(r.read())["healthy_workers"] == 2


def post(serve_app, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(serve_app["base_url"] + path, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"model": "nope", "prompt": "hi"}', 404, "model"),
    (b'{"model": "tiny-llama", "prompt": "hi", "temperature": -1}', 422, "temperature"),
    (b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"model": "tiny-llama", "prompt": [1, 2, 5000]}', 422, "prompt"),
])
def test_bad_input_gets_openai_errors(serve_app, body, status, param):
    code, payload = post(serve_app, "/v1/completions", body)
    assert code == status
    assert payload["error"]["param"] == param
    assert payload["error"]["message"]


def test_the_workers_max_model_len_is_the_routers(serve_app):
    # The engines run at most `limit` tokens, less than the model's 2048: the router
    # refuses a prompt that only the model would fit, and says the real limit.
    limit = serve_app["max_model_len"]
    with urllib.request.urlopen(serve_app["base_url"] + "/v1/models") as r:
        models = json.loads(r.read())
    assert models["data"][0]["max_model_len"] == limit
    code, payload = post(serve_app, "/v1/completions",
                         json.dumps({"model": "tiny-llama", "prompt": [5] * limit}).encode())
    assert code == 413 and payload["error"]["param"] == "prompt"
    assert f"{limit} tokens" in payload["error"]["message"]
    code, payload = post(serve_app, "/v1/completions", json.dumps(
        {"model": "tiny-llama", "prompt": [5] * 20, "max_tokens": limit}).encode())
    assert code == 400 and payload["error"]["param"] == "max_tokens"


def test_long_prompt_is_413_and_empty_messages_400(serve_app):
    code, payload = post(serve_app, "/v1/completions",
                         json.dumps({"model": "tiny-llama", "prompt": [5] * 2048}).encode())
    assert code == 413 and payload["error"]["param"] == "prompt"
    code, payload = post(serve_app, "/v1/chat/completions",
                         json.dumps({"model": "tiny-llama", "messages": []}).encode())
    assert code == 400 and payload["error"]["param"] == "messages"
