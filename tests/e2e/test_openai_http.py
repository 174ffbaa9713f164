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


def test_long_prompt_is_413_and_empty_messages_400(serve_app):
    code, payload = post(serve_app, "/v1/completions",
                         json.dumps({"model": "tiny-llama", "prompt": [5] * 2048}).encode())
    assert code == 413 and payload["error"]["param"] == "prompt"
    code, payload = post(serve_app, "/v1/chat/completions",
                         json.dumps({"model": "tiny-llama", "messages": []}).encode())
    assert code == 400 and payload["error"]["param"] == "messages"
