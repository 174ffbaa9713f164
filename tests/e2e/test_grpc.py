"""The yard.v1 gRPC API through Ray Serve's gRPC proxy, with the generated stubs."""

from __future__ import annotations

import grpc
import openai
import pytest

from router.grpc_stubs import load
from workers import LLM, SamplingParams

METADATA = (("application", "yard"),)
PROMPT = "The quick brown fox"
VOCAB_LIMIT = 10**6  # far past any tiny model's vocabulary


@pytest.fixture(scope="module")
def stubs():
    return load()


@pytest.fixture(scope="module")
def pb2(stubs):
    return stubs.pb2


@pytest.fixture(scope="module")
def channel(serve_app):
    ch = grpc.insecure_channel(serve_app["grpc_target"])
    grpc.channel_ready_future(ch).result(timeout=60)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def yard(stubs, channel):
    return stubs.pb2_grpc.YardStub(channel)


@pytest.fixture(scope="module")
def offline(serve_app):
    return LLM(model=serve_app["model_dir"])


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)


def greedy(pb2, max_tokens: int, **prompt) -> object:
    return pb2.GenerateRequest(model="tiny-llama", **prompt,
                               sampling=pb2.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def collect(responses) -> tuple[list[int], str, object]:
    """All token ids and text of a Generate stream, checking that indexes are
    contiguous and that only the last response carries finish_reason and usage."""
    ids: list[int] = []
    text = ""
    responses = list(responses)
    assert responses
    for r in responses:
        assert r.start_index == len(ids), "gap or overlap in the stream"
        ids.extend(r.token_ids)
        text += r.text
    for r in responses[:-1]:
        assert not r.HasField("finish_reason") and not r.HasField("usage")
    assert len({r.request_id for r in responses}) == 1
    return ids, text, responses[-1]


def test_greedy_generate_matches_offline_engine_and_http(pb2, yard, offline, client):
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    ids, text, last = collect(yard.Generate(greedy(pb2, 20, text=PROMPT), metadata=METADATA, timeout=120))
    assert ids == expected.token_ids and len(ids) == 20
    assert text == expected.text
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == len(expected.prompt_token_ids)

    http = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert http.choices[0].text == text
    assert http.usage.prompt_tokens == last.usage.prompt_tokens


def test_token_id_prompt_and_chat(pb2, yard, offline):
    prompt_ids = offline.generate(PROMPT, SamplingParams(max_tokens=1))[0].prompt_token_ids
    expected = offline.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids, text, _ = collect(yard.Generate(greedy(pb2, 8, token_ids=pb2.TokenIds(ids=prompt_ids)),
                                         metadata=METADATA, timeout=120))
    assert (ids, text) == (expected.token_ids, expected.text)

    messages = [{"role": "user", "content": "What is a KV cache?"}]
    expected = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    chat = pb2.ChatMessages(messages=[pb2.ChatMessage(**m) for m in messages])
    ids, text, last = collect(yard.Generate(greedy(pb2, 8, chat=chat), metadata=METADATA, timeout=120))
    assert (ids, text) == (expected.token_ids, expected.text)
    assert last.finish_reason == "length"


def test_health_and_list_models(pb2, yard):
    health = yard.Health(pb2.HealthRequest(), metadata=METADATA, timeout=30)
    assert health.status == pb2.HealthResponse.SERVING
    assert health.healthy_workers == 2 and health.total_workers == 2
    models = yard.ListModels(pb2.ListModelsRequest(), metadata=METADATA, timeout=30)
    assert [m.id for m in models.models] == ["tiny-llama"]
    assert models.models[0].max_model_len > 0 and models.models[0].created > 0


def bad_requests(pb2):
    return [
        (pb2.GenerateRequest(model="tiny-llama", text="hi", sampling=pb2.SamplingParams(temperature=-1)),
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (pb2.GenerateRequest(model="nope", text="hi"), grpc.StatusCode.NOT_FOUND, "model"),
        (pb2.GenerateRequest(model="tiny-llama", token_ids=pb2.TokenIds(ids=[1, 2, VOCAB_LIMIT])),
         grpc.StatusCode.INVALID_ARGUMENT, "token_ids.ids"),
        (pb2.GenerateRequest(model="tiny-llama", text="hi", sampling=pb2.SamplingParams(max_tokens=100000)),
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
        (pb2.GenerateRequest(model="tiny-llama"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_fields_fail_with_named_field(pb2, yard, case):
    request, code, field = bad_requests(pb2)[case]
    with pytest.raises(grpc.RpcError) as info:
        list(yard.Generate(request, metadata=METADATA, timeout=60))
    assert info.value.code() == code, info.value.details()
    assert field in info.value.details()


def test_bad_request_during_long_generate(pb2, yard, offline):
    n = 300
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    stream = yard.Generate(greedy(pb2, n, text=PROMPT), metadata=METADATA, timeout=300)
    first = next(stream)  # the long request is running on a worker now
    assert first.start_index == 0

    bad, code, field = bad_requests(pb2)[0]
    with pytest.raises(grpc.RpcError) as info:
        list(yard.Generate(bad, metadata=METADATA, timeout=60))
    assert info.value.code() == code and field in info.value.details()

    ids, text, last = collect([first, *stream])
    assert ids == expected.token_ids and len(ids) == n
    assert text == expected.text
    assert last.finish_reason == "length" and last.usage.completion_tokens == n


def test_a_second_stream_with_an_id_in_flight_is_refused_and_the_first_goes_on(pb2, yard, offline):
    n = 200
    expected = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    request = greedy(pb2, n, text=PROMPT)
    request.request_id = "client-chosen-id"
    stream = yard.Generate(request, metadata=METADATA, timeout=300)
    first = next(stream)
    assert first.request_id == "client-chosen-id"

    twin = greedy(pb2, 5, text="another prompt")
    twin.request_id = "client-chosen-id"
    with pytest.raises(grpc.RpcError) as info:
        list(yard.Generate(twin, metadata=METADATA, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in info.value.details() and "client-chosen-id" in info.value.details()

    ids, text, last = collect([first, *stream])
    assert ids == expected.token_ids and text == expected.text
    assert last.finish_reason == "length"
    # Once the first has ended, the id is free again.
    again = greedy(pb2, 4, text=PROMPT)
    again.request_id = "client-chosen-id"
    ids, _, _ = collect(yard.Generate(again, metadata=METADATA, timeout=60))
    assert ids == expected.token_ids[:4]
