"""The yard.v1 proto: it compiles, its stubs import and round-trip, a real grpc server
serves it, and bad fields map to APIErrors naming the proto field."""

from __future__ import annotations

import os
import pickle
from concurrent import futures
from typing import Any, Iterator

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")

from router import grpc_stubs  # noqa: E402
from router.grpc_protocol import from_proto, generate_response, list_models_response  # noqa: E402
from router.openai_errors import APIError  # noqa: E402
from router.openai_responses import ModelCard, TokenLogprob, Usage  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

MODELS = ("tiny-llama",)


@pytest.fixture(scope="module")
def pb2() -> Any:
    return grpc_stubs.load().pb2


def test_generate_into_a_folder_and_staleness(tmp_path: Any) -> None:
    out = tmp_path / "gen"
    assert grpc_stubs.is_stale(grpc_stubs.PROTO_FILE, out)
    grpc_stubs.generate(grpc_stubs.PROTO_FILE, out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".gitignore", "__init__.py", "yard_pb2.py", "yard_pb2.pyi", "yard_pb2_grpc.py"]
    assert "from router.proto.generated import yard_pb2" in (out / "yard_pb2_grpc.py").read_text()
    assert not grpc_stubs.is_stale(grpc_stubs.PROTO_FILE, out)
    # Older than the .proto → stale again.
    os.utime(out / "yard_pb2.py", (0, 0))
    assert grpc_stubs.is_stale(grpc_stubs.PROTO_FILE, out)


def test_stubs_import_with_rays_servicer_names(pb2: Any) -> None:
    stubs = grpc_stubs.load()
    # Ray Serve imports this path from grpc_options.grpc_servicer_functions.
    assert callable(grpc_stubs.add_YardServicer_to_server)
    assert callable(stubs.pb2_grpc.add_YardServicer_to_server)
    assert {m.name for m in pb2.DESCRIPTOR.services_by_name["Yard"].methods} == {"Generate", "Health", "ListModels"}
    generate = pb2.DESCRIPTOR.services_by_name["Yard"].methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert pb2.DESCRIPTOR.package == "yard.v1"


def test_round_trip(pb2: Any) -> None:
    req = pb2.GenerateRequest(model="tiny-llama", chat=pb2.ChatMessages(messages=[
        pb2.ChatMessage(role="user", content="hi")]), request_id="r1", session_id="s", priority=2)
    req.sampling.temperature = 0.0
    req.sampling.stop.extend(["\n"])
    back = pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.WhichOneof("prompt") == "chat"
    # proto3 optional: an explicit 0 is set, an untouched field is not.
    assert back.sampling.HasField("temperature") and not back.sampling.HasField("top_p")


def test_messages_pickle(pb2: Any) -> None:
    """Ray Serve's proxy pickles the request to the replica: the message classes must
    live in an importable module (protoc names it after the .proto's path)."""
    req = pb2.GenerateRequest(model="tiny-llama", text="hi")
    assert type(req).__module__ == "router.proto.generated.yard_pb2"
    assert pickle.loads(pickle.dumps(req)) == req


def test_from_proto_maps_fields(pb2: Any) -> None:
    req = pb2.GenerateRequest(model="tiny-llama", token_ids=pb2.TokenIds(ids=[1, 2, 3]), request_id="r1",
                              session_id="s1", priority=-3)
    s = req.sampling
    s.temperature, s.top_p, s.top_k, s.min_p, s.seed = 0.5, 0.9, 4, 0.1, 7
    s.presence_penalty, s.frequency_penalty, s.repetition_penalty = 0.5, -0.5, 1.2
    s.max_tokens, s.ignore_eos, s.logprobs = 3, True, 2
    s.include_stop_str_in_output, s.skip_special_tokens = True, False
    s.stop.extend(["a", "b"])
    s.stop_token_ids.extend([2])
    out = from_proto(req, MODELS)
    assert out.sampling == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=4, min_p=0.1, seed=7, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, max_tokens=3, ignore_eos=True, logprobs=2,
        include_stop_str_in_output=True, skip_special_tokens=False, stop=("a", "b"), stop_token_ids=(2,))
    assert (out.kind, out.prompt, out.messages, out.request_id, out.session_id, out.priority) == (
        "completion", (1, 2, 3), None, "r1", "s1", -3)
    assert (out.stream, out.include_usage, out.max_tokens) == (True, True, 3)


def test_from_proto_defaults(pb2: Any) -> None:
    out = from_proto(pb2.GenerateRequest(model="tiny-llama", text="hi"), MODELS)
    assert out.sampling == SamplingParams()
    assert (out.prompt, out.request_id, out.session_id, out.priority) == ("hi", None, None, 0)
    chat = from_proto(pb2.GenerateRequest(model="tiny-llama", chat=pb2.ChatMessages(
        messages=[pb2.ChatMessage(role="system", content="a"), pb2.ChatMessage(role="user", content="b")])), MODELS)
    assert (chat.kind, chat.messages) == ("chat", ({"role": "system", "content": "a"},
                                                   {"role": "user", "content": "b"}))


def _bad(pb2: Any, **sampling: Any) -> Any:
    req = pb2.GenerateRequest(model="tiny-llama", text="hi")
    for name, value in sampling.items():
        if isinstance(value, list):
            getattr(req.sampling, name).extend(value)
        else:
            setattr(req.sampling, name, value)
    return req


@pytest.mark.parametrize("build, status, code, param, message", [
    (lambda pb2: pb2.GenerateRequest(text="hi"), 400, "INVALID_ARGUMENT", "model",
     "model is required: name one of the served models"),
    (lambda pb2: pb2.GenerateRequest(model="nope", text="hi"), 404, "NOT_FOUND", "model",
     'model: the model "nope" does not exist; served: ["tiny-llama"]'),
    (lambda pb2: pb2.GenerateRequest(model="tiny-llama"), 400, "INVALID_ARGUMENT", "prompt",
     "prompt is required: set one of text, token_ids, chat"),
    (lambda pb2: pb2.GenerateRequest(model="tiny-llama", text=""), 400, "INVALID_ARGUMENT", "text",
     "text must not be empty"),
    (lambda pb2: pb2.GenerateRequest(model="tiny-llama", token_ids=pb2.TokenIds()), 400, "INVALID_ARGUMENT",
     "token_ids.ids", "token_ids.ids must not be empty"),
    (lambda pb2: pb2.GenerateRequest(model="tiny-llama", token_ids=pb2.TokenIds(ids=[3, -1])), 422,
     "INVALID_ARGUMENT", "token_ids.ids", "token_ids.ids must be >= 0, got -1"),
    (lambda pb2: pb2.GenerateRequest(model="tiny-llama", chat=pb2.ChatMessages()), 400, "INVALID_ARGUMENT",
     "chat.messages", "chat.messages must not be empty"),
    (lambda pb2: pb2.GenerateRequest(model="tiny-llama", chat=pb2.ChatMessages(
        messages=[pb2.ChatMessage(role="bot", content="x")])), 400, "INVALID_ARGUMENT", "chat.messages[0].role",
     "chat.messages[0].role must be one of system, developer, user, assistant, tool; got 'bot'"),
    (lambda pb2: _bad(pb2, top_p=0.0), 422, "INVALID_ARGUMENT", "sampling.top_p",
     "sampling.top_p must be in (0, 1], got 0.0"),
    (lambda pb2: _bad(pb2, temperature=-1.0), 422, "INVALID_ARGUMENT", "sampling.temperature",
     "sampling.temperature must be >= 0, got -1.0"),
    (lambda pb2: _bad(pb2, max_tokens=0), 422, "INVALID_ARGUMENT", "sampling.max_tokens",
     "sampling.max_tokens must be >= 1, got 0"),
    (lambda pb2: _bad(pb2, logprobs=21), 422, "INVALID_ARGUMENT", "sampling.logprobs",
     "sampling.logprobs must be in [0, 20], got 21"),
    (lambda pb2: _bad(pb2, stop=[""]), 422, "INVALID_ARGUMENT", "sampling.stop",
     "sampling.stop must hold non-empty strings, got ''"),
    (lambda pb2: _bad(pb2, stop_token_ids=[-4]), 422, "INVALID_ARGUMENT", "sampling.stop_token_ids",
     "sampling.stop_token_ids must hold ints >= 0, got -4"),
])
def test_from_proto_errors(pb2: Any, build: Any, status: int, code: str, param: str, message: str) -> None:
    with pytest.raises(APIError) as info:
        from_proto(build(pb2), MODELS)
    err = info.value
    assert (err.status, err.grpc_code, err.param, err.message) == (status, code, param, message)


def test_length_errors_name_the_proto_field(pb2: Any) -> None:
    req = from_proto(_bad(pb2, max_tokens=100), MODELS)
    with pytest.raises(APIError) as info:
        req.resolve_sampling(50, 128)
    assert (info.value.param, info.value.grpc_code) == ("sampling.max_tokens", "INVALID_ARGUMENT")


def test_generate_response(pb2: Any) -> None:
    lp = TokenLogprob(5, "Hi", -0.25, ((5, "Hi", -0.25), (7, "Yo", -1.5)))
    resp = generate_response(pb2, "r1", 4, [5], "Hi", logprobs=[lp], finish_reason="stop", stop_reason=2,
                             usage=Usage(3, 5, cached_tokens=2))
    back = pb2.GenerateResponse.FromString(resp.SerializeToString())
    assert (back.request_id, back.start_index, list(back.token_ids), back.text) == ("r1", 4, [5], "Hi")
    assert (back.finish_reason, back.WhichOneof("stop_reason"), back.stop_token_id) == ("stop", "stop_token_id", 2)
    assert (back.usage.prompt_tokens, back.usage.completion_tokens, back.usage.cached_tokens) == (3, 5, 2)
    assert [(t.token_id, t.token, t.logprob) for t in back.logprobs[0].top_logprobs] == [
        (5, "Hi", -0.25), (7, "Yo", -1.5)]
    mid = generate_response(pb2, "r1", 0, [1, 2], "ab")
    assert not mid.HasField("finish_reason") and not mid.HasField("usage")
    assert mid.WhichOneof("stop_reason") is None
    assert generate_response(pb2, "r1", 0, [], "", stop_reason="\n").stop_string == "\n"


def test_served_over_a_real_grpc_server(pb2: Any) -> None:
    """The servicer function, the service path and server streaming, end to end on
    an ephemeral port (what Ray Serve's proxy does with the same function)."""
    stubs = grpc_stubs.load()

    class Servicer(stubs.pb2_grpc.YardServicer):
        def Generate(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
            try:
                req = from_proto(request, MODELS)
            except APIError as e:
                context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)
            yield generate_response(pb2, "r", 0, [1, 2], "ab")
            yield generate_response(pb2, "r", 2, [3], "c", finish_reason="length",
                                    usage=Usage(2, req.sampling.max_tokens))

        def Health(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb2.HealthResponse(status=pb2.HealthResponse.SERVING, healthy_workers=2, total_workers=2)

        def ListModels(self, request: Any, context: Any) -> Any:  # noqa: N802
            return list_models_response(pb2, [ModelCard("tiny-llama", 1, max_model_len=128)])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_stubs.add_YardServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = stubs.pb2_grpc.YardStub(channel)
            req = pb2.GenerateRequest(model="tiny-llama", text="hi")
            req.sampling.max_tokens = 3
            out = list(stub.Generate(req, timeout=10))
            assert [(r.start_index, list(r.token_ids)) for r in out] == [(0, [1, 2]), (2, [3])]
            assert (out[-1].finish_reason, out[-1].usage.completion_tokens) == ("length", 3)
            assert stub.Health(pb2.HealthRequest(), timeout=10).status == pb2.HealthResponse.SERVING
            models = stub.ListModels(pb2.ListModelsRequest(), timeout=10).models
            assert [(m.id, m.max_model_len, m.owned_by) for m in models] == [("tiny-llama", 128, "yard")]
            bad = pb2.GenerateRequest(model="tiny-llama", text="hi")
            bad.sampling.top_p = 0.0
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(bad, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "sampling.top_p must be in (0, 1], got 0.0"
    finally:
        server.stop(None)
