"""OpenAI request parsing, errors and response shapes: exact statuses, params, bodies."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from router.openai_errors import APIError
from router.openai_protocol import (
    GenerateRequest, check_length, check_prompt_token_ids, parse_chat_request,
    parse_completion_request, parse_json,
)
from router.openai_responses import (
    SSE_DONE, ModelCard, StreamEncoder, TokenLogprob, Usage, chat_body, completion_body,
    models_body, new_id, sse,
)
from workers.sampling_params import SamplingParams

MODELS = ("tiny-llama",)


def completion(**fields: Any) -> GenerateRequest:
    return parse_completion_request({"model": "tiny-llama", "prompt": "hi", **fields}, MODELS)


def chat(**fields: Any) -> GenerateRequest:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_chat_request(body, MODELS)


def error_of(fn: Any, *args: Any, **kwargs: Any) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------- valid


def test_completion_maps_every_sampling_field() -> None:
    req = completion(max_tokens=7, temperature=0, top_p=0.5, n=1, stop=["\n", "END"], seed=3,
                     presence_penalty=0.1, frequency_penalty=-0.2, logprobs=2, top_k=5, min_p=0.05,
                     repetition_penalty=1.1, ignore_eos=True, stop_token_ids=[2, 9],
                     stream=True, stream_options={"include_usage": True}, user="u1", priority=-1)
    assert req.sampling == SamplingParams(
        max_tokens=7, temperature=0.0, top_p=0.5, stop=("\n", "END"), seed=3,
        presence_penalty=0.1, frequency_penalty=-0.2, logprobs=2, top_k=5, min_p=0.05,
        repetition_penalty=1.1, ignore_eos=True, stop_token_ids=(2, 9))
    assert (req.kind, req.model, req.prompt, req.messages) == ("completion", "tiny-llama", "hi", None)
    assert (req.max_tokens, req.stream, req.include_usage, req.user, req.priority) == (7, True, True, "u1", -1)
    assert isinstance(req.sampling.temperature, float)


def test_completion_defaults() -> None:
    req = completion()
    assert req.sampling == SamplingParams(max_tokens=16)
    assert (req.max_tokens, req.stream, req.include_usage, req.user, req.priority) == (16, False, False, None, 0)


@pytest.mark.parametrize("prompt, expected", [
    ("hello", "hello"), (["hello"], "hello"), ([1, 2, 3], (1, 2, 3)), ([[4, 5]], (4, 5)),
])
def test_completion_prompt_forms(prompt: Any, expected: Any) -> None:
    assert completion(prompt=prompt).prompt == expected


def test_stop_string_and_nulls() -> None:
    req = completion(stop="###", temperature=None, seed=None, logprobs=None, stream_options=None)
    assert req.sampling == SamplingParams(stop=("###",))


def test_chat_maps_fields() -> None:
    req = chat(max_completion_tokens=9, max_tokens=100, logprobs=True, top_logprobs=3, temperature=0.7)
    assert req.sampling == SamplingParams(max_tokens=9, logprobs=3, temperature=0.7)
    assert (req.kind, req.prompt, req.messages) == ("chat", None, ({"role": "user", "content": "hi"},))
    assert (req.max_tokens, req.max_tokens_param) == (9, "max_completion_tokens")


def test_chat_logprobs_true_alone_is_sampled_token_only() -> None:
    assert chat(logprobs=True).sampling.logprobs == 0
    assert chat(logprobs=False).sampling.logprobs is None


def test_chat_without_max_tokens_fills_the_context() -> None:
    req = chat()
    assert (req.max_tokens, req.max_tokens_param) == (None, "max_tokens")
    assert req.resolve_sampling(num_prompt_tokens=30, max_model_len=128) == SamplingParams(max_tokens=98)
    assert chat(max_tokens=5).resolve_sampling(30, 128) == SamplingParams(max_tokens=5)


def test_chat_text_parts_and_assistant_null_content() -> None:
    req = chat(messages=[
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q", "name": "bob"},
        {"role": "assistant", "content": None},
    ])
    assert req.messages == ({"role": "system", "content": "a\nb"}, {"role": "user", "content": "q"},
                            {"role": "assistant", "content": ""})


def test_unknown_fields_are_ignored_and_request_is_frozen() -> None:
    req = completion(frobnicate=1)
    with pytest.raises(AttributeError):
        req.model = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------- errors


def test_error_pickles_whole() -> None:
    """Ray pickles exceptions raised in replicas and actors; all fields survive."""
    err = APIError(404, "model: nope", "model", code="model_not_found")
    back = pickle.loads(pickle.dumps(err))
    assert (back.status, back.message, back.param, back.type, back.code) == (
        404, "model: nope", "model", "invalid_request_error", "model_not_found")
    assert str(back) == "model: nope"


def test_error_body_shape() -> None:
    err = error_of(completion, temperature=-1)
    assert err.body() == {"error": {
        "message": "temperature must be >= 0, got -1.0", "type": "invalid_request_error",
        "param": "temperature", "code": None}}
    assert err.status == 422 and err.grpc_code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("raw, message", [
    (b'{"model": "tiny-llama",', "malformed JSON in the request body: Expecting property name "
                                 "enclosed in double quotes: line 1 column 24 (char 23)"),
    (b"[1, 2]", "the request body must be a JSON object, got array"),
    (b"\xff\xfe", None),
])
def test_malformed_json_is_400(raw: bytes, message: str | None) -> None:
    err = error_of(parse_json, raw)
    assert (err.status, err.type, err.param) == (400, "invalid_request_error", None)
    if message is not None:
        assert err.message == message


def test_parse_json_valid() -> None:
    assert parse_json(b'{"a": 1}') == {"a": 1}


# (fields, status, param, message): wrong types and missing fields 400, out-of-range 422.
COMPLETION_ERRORS = [
    ({"model": None}, 400, "model", "model is required: name one of the served models"),
    ({"model": 7}, 400, "model", "model must be a string, got number 7"),
    ({"prompt": None}, 400, "prompt", "prompt is required"),
    ({"prompt": ""}, 400, "prompt", "prompt must not be empty"),
    ({"prompt": []}, 400, "prompt", "prompt must not be empty"),
    ({"prompt": {"a": 1}}, 400, "prompt", 'prompt must be a string or an array of token ids, got object {"a": 1}'),
    ({"prompt": [1, "x"]}, 400, "prompt", 'prompt must be a string or an array of token ids, got element "x"'),
    ({"prompt": [1, -2]}, 422, "prompt", "prompt: token ids must be >= 0, got -2"),
    ({"prompt": ["a", "b"]}, 400, "prompt",
     "prompt: batches of prompts are not supported (got 2); send one prompt per request"),
    ({"temperature": "hot"}, 400, "temperature", 'temperature must be a number, got string "hot"'),
    ({"temperature": True}, 400, "temperature", "temperature must be a number, got boolean true"),
    ({"top_p": 0}, 422, "top_p", "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, 422, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"min_p": 2}, 422, "min_p", "min_p must be in [0, 1], got 2.0"),
    ({"top_k": -5}, 422, "top_k", "top_k must be >= 1 (or 0, -1, None for off), got -5"),
    ({"top_k": 2.5}, 400, "top_k", "top_k must be an integer, got number 2.5"),
    ({"presence_penalty": 3}, 422, "presence_penalty", "presence_penalty must be in [-2, 2], got 3.0"),
    ({"frequency_penalty": -2.5}, 422, "frequency_penalty", "frequency_penalty must be in [-2, 2], got -2.5"),
    ({"repetition_penalty": 0}, 422, "repetition_penalty", "repetition_penalty must be > 0, got 0.0"),
    ({"max_tokens": 0}, 422, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"max_tokens": "10"}, 400, "max_tokens", 'max_tokens must be an integer, got string "10"'),
    ({"logprobs": 21}, 422, "logprobs", "logprobs must be in [0, 20], got 21"),
    ({"logprobs": True}, 400, "logprobs", "logprobs must be an integer, got boolean true"),
    ({"seed": "1"}, 400, "seed", 'seed must be an integer, got string "1"'),
    ({"stop": 5}, 400, "stop", "stop must be a string or an array of strings, got number 5"),
    ({"stop": ["a", 1]}, 400, "stop", 'stop must be a string or an array of strings, got array ["a", 1]'),
    ({"stop": [""]}, 422, "stop", "stop must hold non-empty strings, got ''"),
    ({"stop_token_ids": [1, "2"]}, 400, "stop_token_ids", 'stop_token_ids must be an array of integers, got array [1, "2"]'),
    ({"stop_token_ids": [-1]}, 422, "stop_token_ids", "stop_token_ids must hold ints >= 0, got -1"),
    ({"ignore_eos": "yes"}, 400, "ignore_eos", 'ignore_eos must be a boolean, got string "yes"'),
    ({"n": 0}, 422, "n", "n: between 1 and 16 choices, got 0"),
    ({"n": 17}, 422, "n", "n: between 1 and 16 choices, got 17"),
    ({"n": "2"}, 400, "n", 'n must be an integer, got string "2"'),
    ({"best_of": 3}, 400, "best_of", "best_of: only best_of=1 is supported (use n), got 3"),
    ({"echo": True}, 400, "echo", "echo is not supported, got true"),
    ({"logit_bias": {"5": 1}}, 400, "logit_bias", 'logit_bias is not supported, got {"5": 1}'),
    ({"stream": "yes"}, 400, "stream", 'stream must be a boolean, got string "yes"'),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream_options is only allowed when stream is true"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage",
     "stream_options.include_usage must be a boolean, got number 1"),
    ({"stream": True, "stream_options": []}, 400, "stream_options", "stream_options must be an object, got array []"),
    ({"user": 5}, 400, "user", "user must be a string, got number 5"),
    ({"priority": 0.5}, 400, "priority", "priority must be an integer, got number 0.5"),
]


@pytest.mark.parametrize("fields, status, param, message", COMPLETION_ERRORS)
def test_completion_errors(fields: dict[str, Any], status: int, param: str, message: str) -> None:
    err = error_of(completion, **fields)
    assert (err.status, err.param, err.message) == (status, param, message)
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert param in err.message


def test_unknown_model_is_404() -> None:
    err = error_of(parse_completion_request, {"model": "gpt-9", "prompt": "x"}, MODELS)
    assert err.status == 404 and err.grpc_code == "NOT_FOUND"
    assert err.body() == {"error": {
        "message": 'model: the model "gpt-9" does not exist; served: ["tiny-llama"]',
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}


CHAT_ERRORS = [
    ({"messages": None}, 400, "messages", "messages is required"),
    ({"messages": []}, 400, "messages", "messages must not be empty"),
    ({"messages": "hi"}, 400, "messages", 'messages must be an array, got string "hi"'),
    ({"messages": ["hi"]}, 400, "messages[0]", 'messages[0] must be an object, got string "hi"'),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     'messages[0].role must be one of system, developer, user, assistant, tool; got "robot"'),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content",
     "messages[0].content must be a string or an array of text parts, got null"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0]",
     'messages[0].content[0]: only text parts are supported, got {"type": "image_url", "image_url": {}}'),
    ({"logprobs": 3}, 400, "logprobs", "logprobs must be a boolean, got number 3"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "top_logprobs (2) requires logprobs to be true"),
    ({"logprobs": True, "top_logprobs": 30}, 422, "top_logprobs", "top_logprobs must be in [0, 20], got 30"),
    ({"max_completion_tokens": -1}, 422, "max_completion_tokens", "max_completion_tokens must be >= 1, got -1"),
    ({"max_tokens": 0}, 422, "max_tokens", "max_tokens must be >= 1, got 0"),
    ({"tools": [{"type": "function"}]}, 400, "tools", 'tools is not supported, got [{"type": "function"}]'),
    ({"response_format": {"type": "json_object"}}, 400, "response_format",
     'response_format: only type "text" is supported, got {"type": "json_object"}'),
]


@pytest.mark.parametrize("fields, status, param, message", CHAT_ERRORS)
def test_chat_errors(fields: dict[str, Any], status: int, param: str, message: str) -> None:
    err = error_of(chat, **fields)
    assert (err.status, err.param, err.message) == (status, param, message)


def test_long_values_are_cut_in_messages() -> None:
    err = error_of(completion, temperature="x" * 500)
    assert err.message == 'temperature must be a number, got string "' + "x" * 76 + "..."


# ---------------------------------------------------------------------------- lengths


def test_check_length() -> None:
    assert check_length(10, 5, 16) == 5
    assert check_length(10, 6, 16) == 6
    assert check_length(10, None, 16) == 6
    err = error_of(check_length, 10, 7, 16)
    assert (err.status, err.param, err.code) == (400, "max_tokens", "context_length_exceeded")
    assert err.message == ("max_tokens: 7 output tokens requested, but this model's maximum context "
                           "length is 16 tokens and the prompt holds 10, so at most 6 fit")
    err = error_of(check_length, 16, 1, 16)
    assert (err.status, err.param, err.code) == (413, "prompt", "context_length_exceeded")
    assert err.message == ("prompt: the prompt is 16 tokens, but this model's maximum context length "
                           "is 16 tokens, and at least one must be left for the output")
    assert err.grpc_code == "INVALID_ARGUMENT"


def test_resolve_sampling_names_the_fields_the_client_used() -> None:
    err = error_of(chat(max_completion_tokens=50).resolve_sampling, 100, 128)
    assert (err.status, err.param) == (400, "max_completion_tokens")
    err = error_of(chat().resolve_sampling, 200, 128)
    assert (err.status, err.param) == (413, "messages")
    err = error_of(completion().resolve_sampling, 120, 128)
    assert (err.status, err.param) == (400, "max_tokens")


def test_check_prompt_token_ids() -> None:
    check_prompt_token_ids((0, 5, 99), vocab_size=100)
    err = error_of(check_prompt_token_ids, (0, 100, 300), 100)
    assert (err.status, err.param, err.message) == (422, "prompt", "prompt: token id 100 is out of the vocabulary (size 100)")


# ---------------------------------------------------------------------------- responses

LP = (TokenLogprob(5, "Hi", -0.25, ((5, "Hi", -0.25), (7, "Yo", -1.5))),
      TokenLogprob(9, " there", -0.5, ((9, " there", -0.5), (3, "!", -2.0))))


def test_completion_body() -> None:
    body = completion_body("cmpl-1", "tiny-llama", 1700000000, "Hi there", "stop", Usage(4, 2),
                           logprobs=LP, stop_reason="\n")
    assert body == {
        "id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": "tiny-llama",
        "choices": [{"index": 0, "text": "Hi there", "finish_reason": "stop", "stop_reason": "\n",
                     "logprobs": {"tokens": ["Hi", " there"], "token_logprobs": [-0.25, -0.5],
                                  "top_logprobs": [{"Hi": -0.25, "Yo": -1.5}, {" there": -0.5, "!": -2.0}],
                                  "text_offset": [0, 2]}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }


def test_chat_body() -> None:
    body = chat_body("chatcmpl-1", "tiny-llama", 1700000000, "Hi there", "length", Usage(4, 2, cached_tokens=3),
                     logprobs=LP[:1])
    assert body == {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "tiny-llama",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                     "finish_reason": "length", "stop_reason": None,
                     "logprobs": {"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
                                               "top_logprobs": [
                                                   {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                                                   {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}]}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                  "prompt_tokens_details": {"cached_tokens": 3}},
    }


def test_bodies_parse_with_the_openai_client_types() -> None:
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    c = openai_types.Completion.model_validate(
        completion_body("cmpl-1", "m", 1, "Hi there", "stop", Usage(4, 2), logprobs=LP))
    assert c.choices[0].logprobs.top_logprobs == [{"Hi": -0.25, "Yo": -1.5}, {" there": -0.5, "!": -2.0}]
    cc = ChatCompletion.model_validate(chat_body("chatcmpl-1", "m", 1, "x", "stop", Usage(1, 1), logprobs=LP))
    assert cc.choices[0].logprobs.content[1].top_logprobs[1].token == "!"
    assert cc.usage.total_tokens == 2
    enc = StreamEncoder("chat", "chatcmpl-1", "m", 1, include_usage=True)
    for line in enc.start() + enc.delta("a", LP) + enc.finish("stop", Usage(1, 1))[:-1]:
        ChatCompletionChunk.model_validate(json.loads(line.removeprefix("data: ")))
    page = openai_types.Model.model_validate(models_body([ModelCard("m", 5)])["data"][0])
    assert page.id == "m"


def test_models_body() -> None:
    assert models_body([ModelCard("tiny-llama", 1700000000, max_model_len=128)]) == {
        "object": "list",
        "data": [{"id": "tiny-llama", "object": "model", "created": 1700000000, "owned_by": "yard",
                  "max_model_len": 128}],
    }


def test_ids() -> None:
    a, b = new_id("completion"), new_id("chat")
    assert a.startswith("cmpl-") and len(a) == 37
    assert b.startswith("chatcmpl-") and len(b) == 41
    assert new_id("chat") != b


def test_sse_exact() -> None:
    assert sse({"a": "é", "b": [1, None]}) == 'data: {"a":"é","b":[1,null]}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"


def test_completion_stream_exact() -> None:
    enc = StreamEncoder("completion", "cmpl-1", "m", 7)
    lines = enc.start() + enc.delta("Hi") + enc.delta("") + enc.finish("length", Usage(3, 2), text=" you")
    head = '"id":"cmpl-1","object":"text_completion","created":7,"model":"m"'
    assert lines == [
        'data: {' + head + ',"choices":[{"index":0,"text":"Hi","logprobs":null,'
        '"finish_reason":null,"stop_reason":null}]}\n\n',
        'data: {' + head + ',"choices":[{"index":0,"text":" you","logprobs":null,'
        '"finish_reason":"length","stop_reason":null}]}\n\n',
        "data: [DONE]\n\n",
    ]


def test_completion_stream_usage_and_logprob_offsets() -> None:
    enc = StreamEncoder("completion", "cmpl-1", "m", 7, include_usage=True)
    first = json.loads(enc.delta("Hi", LP[:1])[0][6:])
    second = json.loads(enc.delta(" there", LP[1:])[0][6:])
    *_, last_chunk, usage_line, done = [""] + enc.finish("stop", Usage(3, 2), stop_reason=2)
    assert first["usage"] is None and first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]
    assert json.loads(last_chunk[6:])["choices"][0]["stop_reason"] == 2
    assert usage_line == ('data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m",'
                          '"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n')
    assert done == SSE_DONE


def test_chat_stream_exact() -> None:
    enc = StreamEncoder("chat", "chatcmpl-1", "m", 7, include_usage=True)
    lines = enc.start() + enc.delta("Hi") + enc.finish("stop", Usage(3, 1))
    head = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m"'
    assert lines == [
        'data: {' + head + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"logprobs":null,"finish_reason":null}],"usage":null}\n\n',
        'data: {' + head + ',"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,'
        '"finish_reason":null,"stop_reason":null}],"usage":null}\n\n',
        'data: {' + head + ',"choices":[{"index":0,"delta":{},"logprobs":null,'
        '"finish_reason":"stop","stop_reason":null}],"usage":null}\n\n',
        'data: {' + head + ',"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n',
        "data: [DONE]\n\n",
    ]


def test_chat_stream_role_sent_once_even_without_start() -> None:
    enc = StreamEncoder("chat", "c", "m", 0)
    lines = enc.delta("a") + enc.delta("b") + enc.finish("stop", Usage(1, 2))
    deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in lines[:-1]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": "b"}, {}]
    assert "usage" not in json.loads(lines[-2][6:])


def test_stream_error_event() -> None:
    enc = StreamEncoder("chat", "c", "m", 0)
    err = APIError(503, "worker lost and no worker left to resume on")
    assert enc.error(err) == [
        'data: {"error":{"message":"worker lost and no worker left to resume on","type":"server_error",'
        '"param":null,"code":null}}\n\n', SSE_DONE]
    assert err.grpc_code == "UNAVAILABLE"
