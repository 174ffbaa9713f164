"""Fuzzing both APIs while well-formed streams are in flight: no request gets a 5xx
(gRPC: INTERNAL, UNKNOWN or UNAVAILABLE), every refusal says what is wrong, and the
streams come out exactly as an undisturbed run.

HTTP requests come from the OpenAPI schema we serve (router/openapi_schema.py) with
schemathesis: well-formed ones and, separately, ones that break it. gRPC requests
are built by hypothesis from the proto's fields, out-of-range values included. Both
go to the `secure` application (keys and limits on, so that valid requests stay
short), with a valid key.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from router.grpc_stubs import load
from router.openapi_schema import OPENAPI
from workers import LLM, SamplingParams

SCHEMA = schemathesis.openapi.from_dict(OPENAPI)
AUTH = {"Authorization": "Bearer team-key"}
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
STREAM_TOKENS = 400
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE


@pytest.fixture(scope="module")
def streams_in_flight(serve_app):
    """Three long greedy streams on the main application for the module's duration;
    yields a function that joins them and returns (got, expected) texts."""
    client = openai.OpenAI(base_url=serve_app["base_url"] + "/v1", api_key="unused", max_retries=0)
    prompts = [f"Stream {i} tells a long story about" for i in range(3)]

    def run(prompt: str) -> str:
        chunks = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=STREAM_TOKENS,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    pool = ThreadPoolExecutor(len(prompts))
    futures = [pool.submit(run, p) for p in prompts]

    def finish() -> tuple[list[str], list[str]]:
        got = [f.result(timeout=600) for f in futures]
        params = SamplingParams(temperature=0, max_tokens=STREAM_TOKENS, ignore_eos=True)
        expected = [o.text for o in LLM(model=serve_app["model_dir"]).generate(prompts, params)]
        return got, expected

    yield finish
    pool.shutdown(wait=True)


def served_model(case: Any, mode: GenerationMode) -> Any:
    """Generated bodies name a random model (a quick 404): well-formed ones name ours,
    so that they reach the workers; malformed ones in half the cases."""
    if isinstance(case.body, dict) and "model" in case.body and (mode is POSITIVE or hash(repr(case.body)) % 2):
        case.body["model"] = "tiny-llama"
    return case


# A GET without parameters has no way to be malformed: those run well-formed only.
@pytest.mark.parametrize("method, path, mode", [
    ("POST", "/v1/completions", POSITIVE), ("POST", "/v1/completions", NEGATIVE),
    ("POST", "/v1/chat/completions", POSITIVE), ("POST", "/v1/chat/completions", NEGATIVE),
    ("GET", "/v1/models", POSITIVE), ("GET", "/health", POSITIVE)])
def test_fuzzed_http_requests_get_no_server_error(secure_app, streams_in_flight, method, path, mode):
    operation = SCHEMA[path][method]
    seen: dict[int, int] = {}

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode).map(lambda case: served_model(case, mode)))
    def check(case: Any) -> None:
        response = case.call(base_url=secure_app["base_url"], headers=AUTH, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"], error

    check()
    print(f"{method} {path} {mode.value}: statuses {sorted(seen.items())}")  # pytest -s shows the spread
    assert seen and max(seen) < 500, seen


GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_floats = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from([0.0, 0.5, 1.0, -1.0])
_ints32 = st.integers(-2**31, 2**31 - 1) | st.integers(-5, 40)


def sampling_params(pb2: Any) -> st.SearchStrategy:
    fields = {"temperature": _floats, "top_p": _floats, "top_k": _ints32, "min_p": _floats,
              "seed": st.integers(-2**63, 2**63 - 1), "presence_penalty": _floats, "frequency_penalty": _floats,
              "repetition_penalty": _floats, "max_tokens": _ints32, "ignore_eos": st.booleans(),
              "logprobs": _ints32, "stop": st.lists(st.text(max_size=6), max_size=3),
              "stop_token_ids": st.lists(st.integers(-2**63, 2**63 - 1), max_size=3)}
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: pb2.SamplingParams(**kw))


def generate_requests(pb2: Any) -> st.SearchStrategy:
    prompts = st.one_of(
        st.fixed_dictionaries({"text": st.text(max_size=80)}),
        st.fixed_dictionaries({"token_ids": st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(0, 300),
                                                     max_size=80).map(lambda ids: pb2.TokenIds(ids=ids))}),
        st.fixed_dictionaries({"chat": st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "robot", ""]), "content": st.text(max_size=40)}),
            max_size=3).map(lambda ms: pb2.ChatMessages(messages=[pb2.ChatMessage(**m) for m in ms]))}),
        st.just({}))
    return st.builds(
        lambda prompt, model, sampling, request_id, priority: pb2.GenerateRequest(
            model=model, sampling=sampling, request_id=request_id, priority=priority, **prompt),
        prompts, st.sampled_from(["tiny-llama", "tiny-llama", "other", ""]), sampling_params(pb2),
        st.text(max_size=12), st.sampled_from([0, 0, 0, 1]))


def test_fuzzed_grpc_requests_get_no_server_error(secure_app, streams_in_flight):
    stubs = load()
    metadata = (("application", "secure"), ("authorization", "Bearer team-key"))
    codes: dict[str, int] = {}
    with grpc.insecure_channel(secure_app["grpc_target"]) as channel:
        yard = stubs.pb2_grpc.YardStub(channel)

        @FUZZ
        @given(request=generate_requests(stubs.pb2))
        def check(request: Any) -> None:
            try:
                responses = list(yard.Generate(request, metadata=metadata, timeout=120))
                code = grpc.StatusCode.OK
                assert responses and responses[-1].HasField("finish_reason")
            except grpc.RpcError as e:
                code = e.code()
                assert e.details(), e
            codes[code.name] = codes.get(code.name, 0) + 1
            assert code in GRPC_OK, (request, code)

        check()
    print(f"gRPC Generate: codes {sorted(codes.items())}")
    assert codes.get("OK") and codes.get("INVALID_ARGUMENT"), codes


def test_the_streams_in_flight_were_undisturbed(streams_in_flight):
    got, expected = streams_in_flight()
    assert got == expected
    assert all(got)
