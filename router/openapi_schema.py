"""The OpenAPI description of the HTTP API, served at /openapi.json.

FastAPI cannot describe our endpoints itself: they read the raw body, so that each
error names the field (router/openai_protocol.py). This is written by hand from
what that parser accepts; the e2e fuzz test generates requests from it.
"""

from __future__ import annotations

from typing import Any

from router.openai_protocol import MAX_CHOICES
from workers.sampling_params import MAX_LOGPROBS

_NUMBER = {"type": "number"}
_INT = {"type": "integer"}
_STRINGS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


def _between(low: float, high: float, kind: dict[str, str] = _NUMBER) -> dict[str, Any]:
    return {**kind, "minimum": low, "maximum": high}


_PENALTY = _between(-2, 2)
_INT64 = _between(-2**63, 2**63 - 1, _INT)

# Sampling fields both endpoints take, with the ranges the parser accepts
# (docs/engine.md has their meaning). A value outside is refused with a 400 or 422.
_SAMPLING: dict[str, Any] = {
    "temperature": {**_NUMBER, "minimum": 0}, "top_p": {**_NUMBER, "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {**_INT, "minimum": -1}, "min_p": _between(0, 1), "seed": _INT64,
    "presence_penalty": _PENALTY, "frequency_penalty": _PENALTY,
    "repetition_penalty": {**_NUMBER, "exclusiveMinimum": 0},
    "stop": _STRINGS, "stop_token_ids": {"type": "array", "items": {**_INT, "minimum": 0}},
    "ignore_eos": {"type": "boolean"},
    "include_stop_str_in_output": {"type": "boolean"}, "skip_special_tokens": {"type": "boolean"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"}, "priority": _INT, "n": _between(1, MAX_CHOICES, _INT),
    "best_of": {**_INT, "const": 1},
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string"},
        # Token ids must also be below the model's vocabulary size (400 otherwise).
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {**_INT, "minimum": 0}, "minItems": 1}]},
        "max_tokens": {**_INT, "minimum": 1},
        "logprobs": _between(0, MAX_LOGPROBS, _INT),
        "echo": {"type": "boolean", "const": False},  # not supported: refused when true
        **_SAMPLING,
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                   "content": {"type": "string"}},
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_tokens": {**_INT, "minimum": 1},
        "max_completion_tokens": {**_INT, "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": _between(0, MAX_LOGPROBS, _INT),  # with logprobs true
        **_SAMPLING,
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"],
                             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                            "param": {"type": ["string", "null"]},
                                            "code": {"type": ["string", "null"]}}}},
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "an OpenAI-style error naming the field",
                     "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


def _generate(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": {"description": "the result, or server-sent events when stream is true",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/event-stream": {"schema": {"type": "string"}}}},
                      **_errors(400, 401, 403, 404, 413, 422, 429, 503)},
    }}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "yard", "version": "1", "description": "OpenAI-style completions and chat"},
    "paths": {
        "/health": {"get": {"summary": "healthy workers", "responses": {
            "200": {"description": "at least one worker is healthy"},
            "503": {"description": "no worker is healthy"}}}},
        "/v1/models": {"get": {"summary": "the served model", "responses": {
            "200": {"description": "the model list", "content": {"application/json": {"schema": {"type": "object"}}}},
            **_errors(401)}}},
        "/v1/completions": _generate("text completion", _COMPLETION_REQUEST),
        "/v1/chat/completions": _generate("chat completion", _CHAT_REQUEST),
    },
}
