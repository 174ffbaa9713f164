"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) → `GenerateRequest`.

The parser reads a JSON object the way OpenAI documents it, plus vLLM's sampling
extras (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, priority...),
and fails with an `APIError` that names the field and the value (status rule in
router/openai_errors.py). Unknown fields are ignored, as vLLM does; known fields yard
cannot honour (n > 1, echo, tools, logit_bias...) are refused rather than ignored,
because a silently different answer is worse than an error.

Pure Python: no Ray, no torch; `workers.SamplingParams` does the range checks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from router.openai_errors import (
    CONTENT_TOO_LARGE, APIError, bad_request, invalid_value, model_not_found, show,
)
from workers.sampling_params import SamplingParams

Kind = Literal["completion", "chat"]

# OpenAI's default for /v1/completions (vLLM's too); chat without max_tokens fills
# the context, which is only known once the prompt is tokenized (resolve_sampling).
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_CHOICES = 16  # `n`

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_INT_FIELDS = ("top_k", "seed")
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


@dataclass(frozen=True)
class GenerateRequest:
    """One validated request, whichever API it came through.

    Exactly one of `prompt` (text or token ids) and `messages` is set. `messages`
    holds {"role", "content"} dicts with text content, ready for the chat template
    (pass `list(messages)` to encode_chat).

    `max_tokens` is what the client asked for; None means "fill the context"
    (chat's default). `sampling.max_tokens` is final only after `resolve_sampling`,
    which the router calls once it knows the prompt length.
    """

    kind: Kind
    model: str
    prompt: Union[str, tuple[int, ...], None]
    messages: Optional[tuple[dict[str, str], ...]]
    sampling: SamplingParams
    max_tokens: Optional[int]
    stream: bool = False
    include_usage: bool = False
    user: Optional[str] = None
    priority: int = 0
    n: int = 1  # choices, each sampled on its own (router/choices.py)
    request_id: Optional[str] = None  # given by gRPC clients; HTTP ids are the router's
    session_id: Optional[str] = None
    # The field the client used for max_tokens (chat: max_completion_tokens or
    # max_tokens), so that a length error names what the client sent.
    max_tokens_param: str = "max_tokens"

    @property
    def prompt_param(self) -> str:
        return "messages" if self.messages is not None else "prompt"

    def resolve_sampling(self, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """The SamplingParams to run: max_tokens checked against the context and, when
        the client left it out, set to what the context still holds."""
        max_tokens = check_length(num_prompt_tokens, self.max_tokens, max_model_len,
                                  prompt_param=self.prompt_param,
                                  max_tokens_param=self.max_tokens_param)
        if max_tokens == self.sampling.max_tokens:
            return self.sampling
        return dataclasses.replace(self.sampling, max_tokens=max_tokens)


# ---------------------------------------------------------------------------- body


def parse_json(raw: Union[bytes, str]) -> dict[str, Any]:
    """The request body as a JSON object, or 400."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(None, f"malformed JSON in the request body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def parse_completion_request(body: dict[str, Any], served_models: Collection[str]) -> GenerateRequest:
    """A /v1/completions body → GenerateRequest (raises APIError)."""
    model = _model(body, served_models)
    _reject_unsupported(body, "completion")
    prompt = _completion_prompt(body)
    max_tokens = _opt(body, "max_tokens", "int")
    if max_tokens is None:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    logprobs = _opt(body, "logprobs", "int")
    sampling = _sampling(body, max_tokens, logprobs, {"max_tokens": "max_tokens"})
    return GenerateRequest(kind="completion", model=model, prompt=prompt, messages=None,
                           sampling=sampling, max_tokens=max_tokens, **_common(body))


def parse_chat_request(body: dict[str, Any], served_models: Collection[str]) -> GenerateRequest:
    """A /v1/chat/completions body → GenerateRequest (raises APIError)."""
    model = _model(body, served_models)
    _reject_unsupported(body, "chat")
    messages = _messages(body)
    # max_completion_tokens replaced max_tokens in OpenAI's chat API; both are read.
    max_tokens_param = "max_completion_tokens"
    max_tokens = _opt(body, "max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens_param = "max_tokens"
        max_tokens = _opt(body, "max_tokens", "int")
    # Chat logprobs: a bool, and top_logprobs for how many alternatives.
    want_logprobs = _opt(body, "logprobs", "bool")
    top_logprobs = _opt(body, "top_logprobs", "int")
    if top_logprobs is not None and not want_logprobs:
        raise bad_request("top_logprobs", f"top_logprobs ({top_logprobs}) requires logprobs to be true")
    logprobs = (top_logprobs or 0) if want_logprobs else None
    sampling = _sampling(body, max_tokens, logprobs,
                         {"max_tokens": max_tokens_param, "logprobs": "top_logprobs"})
    return GenerateRequest(kind="chat", model=model, prompt=None, messages=messages,
                           sampling=sampling, max_tokens=max_tokens,
                           max_tokens_param=max_tokens_param, **_common(body))


def check_length(num_prompt_tokens: int, max_tokens: Optional[int], max_model_len: int, *,
                 prompt_param: str = "prompt", max_tokens_param: str = "max_tokens") -> int:
    """The output budget: max_tokens if prompt + max_tokens fits in max_model_len, or
    all that is left when max_tokens is None. A prompt that leaves no room for one
    output token is 413; a max_tokens that does not fit is 400."""
    if num_prompt_tokens >= max_model_len:
        raise APIError(
            CONTENT_TOO_LARGE,
            f"{prompt_param}: the prompt is {num_prompt_tokens} tokens, but this model's maximum "
            f"context length is {max_model_len} tokens, and at least one must be left for the output",
            prompt_param, code="context_length_exceeded")
    room = max_model_len - num_prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise bad_request(
            max_tokens_param,
            f"{max_tokens_param}: {max_tokens} output tokens requested, but this model's maximum "
            f"context length is {max_model_len} tokens and the prompt holds {num_prompt_tokens}, "
            f"so at most {room} fit",
            code="context_length_exceeded")
    return max_tokens


def check_prompt_token_ids(token_ids: Collection[int], vocab_size: int, param: str = "prompt") -> None:
    """Token ids given by the client must exist in the model's vocabulary."""
    bad = [t for t in token_ids if t >= vocab_size]
    if bad:
        raise invalid_value(param, f"{param}: token id {bad[0]} is out of the vocabulary "
                                   f"(size {vocab_size})")


# ---------------------------------------------------------------------------- fields


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _got(value: Any) -> str:
    return "null" if value is None else f"{_json_type(value)} {show(value)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS = {
    "int": (_is_int, "an integer"),
    "number": (lambda v: _is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}


def _opt(body: dict[str, Any], name: str, kind: str, param: Optional[str] = None) -> Any:
    """body[name] if present and not null, after a type check (400 naming the field)."""
    value = body.get(name)
    if value is None:
        return None
    ok, what = _CHECKS[kind]
    if not ok(value):
        param = param or name
        raise bad_request(param, f"{param} must be {what}, got {_got(value)}")
    return value


def _model(body: dict[str, Any], served_models: Collection[str]) -> str:
    model = _opt(body, "model", "str")
    if not model:
        raise bad_request("model", "model is required: name one of the served models")
    if model not in served_models:
        raise model_not_found(model, list(served_models))
    return model


def _common(body: dict[str, Any]) -> dict[str, Any]:
    stream = bool(_opt(body, "stream", "bool"))
    options = _opt(body, "stream_options", "object")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options", "stream_options is only allowed when stream is true")
        include_usage = bool(_opt(options, "include_usage", "bool", "stream_options.include_usage"))
    priority = _opt(body, "priority", "int")
    n = _opt(body, "n", "int")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise invalid_value("n", f"n: between 1 and {MAX_CHOICES} choices, got {show(n)}")
    return {"stream": stream, "include_usage": include_usage, "user": _opt(body, "user", "str"),
            "priority": 0 if priority is None else priority, "n": 1 if n is None else n}


def _reject_unsupported(body: dict[str, Any], kind: Kind) -> None:
    best_of = _opt(body, "best_of", "int")
    if best_of is not None and best_of != 1:
        raise bad_request("best_of", f"best_of: only best_of=1 is supported (use n), got {show(best_of)}")
    unsupported = ["logit_bias", "tools", "functions"]
    unsupported += ["echo", "suffix"] if kind == "completion" else ["audio", "prediction"]
    for name in unsupported:
        value = body.get(name)
        if value not in (None, False, "", [], {}):
            raise bad_request(name, f"{name} is not supported, got {show(value)}")
    fmt = _opt(body, "response_format", "object")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise bad_request("response_format", f"response_format: only type \"text\" is supported, "
                                             f"got {show(fmt)}")


def _sampling(body: dict[str, Any], max_tokens: Optional[int], logprobs: Optional[int],
              rename: dict[str, str]) -> SamplingParams:
    """SamplingParams from the body's fields; its ValueErrors become 422 naming the
    field the client sent (`rename` maps SamplingParams names to body names)."""
    kwargs: dict[str, Any] = {"logprobs": logprobs}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    for name in _FLOAT_FIELDS:
        value = _opt(body, name, "number")
        if value is not None:
            kwargs[name] = float(value)
    for name in _INT_FIELDS:
        kwargs[name] = _opt(body, name, "int")
    for name in _BOOL_FIELDS:
        value = _opt(body, name, "bool")
        if value is not None:
            kwargs[name] = value
    stop = body.get("stop")
    if stop is not None:
        if not isinstance(stop, (str, list)) or (isinstance(stop, list) and not all(isinstance(s, str) for s in stop)):
            raise bad_request("stop", f"stop must be a string or an array of strings, got {_got(stop)}")
        kwargs["stop"] = stop
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
            raise bad_request("stop_token_ids", f"stop_token_ids must be an array of integers, got {_got(ids)}")
        kwargs["stop_token_ids"] = ids
    return sampling_params(kwargs, rename)


def sampling_params(kwargs: dict[str, Any], rename: Optional[dict[str, str]] = None,
                    prefix: str = "") -> SamplingParams:
    """SamplingParams(**kwargs), with its ValueError turned into a 422 APIError whose
    param is the client's name for the field (`prefix` + rename.get(field, field))."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        message = str(e)
        # SamplingParams messages start with the field name: "top_p must be in (0, 1], got 0".
        field = message.split(" ", 1)[0]
        param = prefix + (rename or {}).get(field, field)
        raise invalid_value(param, param + message[len(field):]) from None


def _completion_prompt(body: dict[str, Any]) -> Union[str, tuple[int, ...]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("prompt", "prompt is required")
    # A batch of one ([text] or [[ids]]) is one prompt; larger batches are refused
    # like n > 1: one request, one stream.
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt", f"prompt: batches of prompts are not supported (got {len(prompt)}); "
                                        "send one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt", "prompt must not be empty")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request("prompt", "prompt must not be empty")
        for t in prompt:
            if not _is_int(t):
                raise bad_request("prompt", f"prompt must be a string or an array of token ids, "
                                            f"got element {show(t)}")
            if t < 0:
                raise invalid_value("prompt", f"prompt: token ids must be >= 0, got {t}")
        return tuple(prompt)
    raise bad_request("prompt", f"prompt must be a string or an array of token ids, "
                                f"got {_got(prompt)}")


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if messages is None:
        raise bad_request("messages", "messages is required")
    if not isinstance(messages, list):
        raise bad_request("messages", f"messages must be an array, got {_got(messages)}")
    if not messages:
        raise bad_request("messages", "messages must not be empty")
    return tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))


def _message(message: Any, param: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise bad_request(param, f"{param} must be an object, got {_got(message)}")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"{param}.role", f"{param}.role must be one of {', '.join(CHAT_ROLES)}; "
                                           f"got {show(role)}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""  # an assistant turn that only called tools
    if isinstance(content, list):
        content = _text_parts(content, f"{param}.content")
    if not isinstance(content, str):
        raise bad_request(f"{param}.content", f"{param}.content must be a string or an array of text "
                                              f"parts, got {_got(content)}")
    return {"role": role, "content": content}


def _text_parts(parts: list[Any], param: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise bad_request(f"{param}[{j}]", f"{param}[{j}]: only text parts are supported, got {show(part)}")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{param}[{j}].text", f"{param}[{j}].text must be a string, got {show(text)}")
        texts.append(text)
    # vLLM joins text parts with newlines for string-content chat templates.
    return "\n".join(texts)
