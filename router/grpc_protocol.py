"""yard.v1 gRPC messages ↔ the router's GenerateRequest, with the HTTP API's checks.

A bad field raises the same `APIError` as over HTTP, its param the proto field
path ("sampling.top_p", "chat.messages[0].role"); the ingress turns it into
`grpc.StatusCode[err.grpc_code]` (INVALID_ARGUMENT, or NOT_FOUND for an unknown
model) with `err.message` as the details.

Works on any yard_pb2 message object (no grpc import): the generated module is
passed in where a message is built.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from types import ModuleType
from typing import Any, Optional

from router.openai_errors import bad_request, invalid_value, model_not_found
from router.openai_protocol import CHAT_ROLES, GenerateRequest, sampling_params
from router.openai_responses import ModelCard, TokenLogprob, Usage

# proto3 `optional` scalars: read only when set, so unset means SamplingParams' default.
_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "max_tokens", "ignore_eos",
                      "logprobs", "include_stop_str_in_output", "skip_special_tokens")


def from_proto(msg: Any, served_models: Collection[str]) -> GenerateRequest:
    """A yard.v1.GenerateRequest → GenerateRequest (raises APIError)."""
    if not msg.model:
        raise bad_request("model", "model is required: name one of the served models")
    if msg.model not in served_models:
        raise model_not_found(msg.model, list(served_models))

    prompt: Any = None
    messages: Optional[tuple[dict[str, str], ...]] = None
    which = msg.WhichOneof("prompt")
    if which is None:
        raise bad_request("prompt", "prompt is required: set one of text, token_ids, chat")
    if which == "text":
        if not msg.text:
            raise bad_request("text", "text must not be empty")
        prompt = msg.text
    elif which == "token_ids":
        prompt = _token_ids(msg.token_ids.ids)
    else:
        messages = _chat(msg.chat.messages)

    sampling_msg = msg.sampling
    kwargs: dict[str, Any] = {name: getattr(sampling_msg, name)
                              for name in _OPTIONAL_SAMPLING if sampling_msg.HasField(name)}
    kwargs["stop"] = list(sampling_msg.stop)
    kwargs["stop_token_ids"] = list(sampling_msg.stop_token_ids)
    sampling = sampling_params(kwargs, prefix="sampling.")
    return GenerateRequest(
        kind="chat" if messages is not None else "completion",
        model=msg.model, prompt=prompt, messages=messages, sampling=sampling,
        # gRPC keeps the offline LLM's default (16) rather than filling the context.
        max_tokens=sampling.max_tokens, max_tokens_param="sampling.max_tokens",
        stream=True, include_usage=True, priority=msg.priority,
        request_id=msg.request_id or None, session_id=msg.session_id or None)


def _token_ids(ids: Sequence[int]) -> tuple[int, ...]:
    if not ids:
        raise bad_request("token_ids.ids", "token_ids.ids must not be empty")
    for t in ids:
        if t < 0:
            raise invalid_value("token_ids.ids", f"token_ids.ids must be >= 0, got {t}")
    return tuple(ids)


def _chat(chat: Sequence[Any]) -> tuple[dict[str, str], ...]:
    if not chat:
        raise bad_request("chat.messages", "chat.messages must not be empty")
    out = []
    for i, m in enumerate(chat):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"chat.messages[{i}].role",
                              f"chat.messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {m.role!r}")
        out.append({"role": m.role, "content": m.content})
    return tuple(out)


def generate_response(pb2: ModuleType, request_id: str, start_index: int, token_ids: Sequence[int],
                      text: str, *, logprobs: Optional[Sequence[TokenLogprob]] = None,
                      finish_reason: Optional[str] = None, stop_reason: Any = None,
                      usage: Optional[Usage] = None) -> Any:
    """A yard.v1.GenerateResponse: one batch of tokens; finish_reason, stop_reason
    and usage on the last one."""
    resp = pb2.GenerateResponse(request_id=request_id, start_index=start_index,
                                token_ids=list(token_ids), text=text)
    if finish_reason is not None:
        resp.finish_reason = finish_reason
    if isinstance(stop_reason, str):
        resp.stop_string = stop_reason
    elif stop_reason is not None:
        resp.stop_token_id = stop_reason
    if usage is not None:
        resp.usage.prompt_tokens = usage.prompt_tokens
        resp.usage.completion_tokens = usage.completion_tokens
        resp.usage.cached_tokens = usage.cached_tokens or 0
    for lp in logprobs or ():
        entry = resp.logprobs.add(token_id=lp.token_id, logprob=lp.logprob, token=lp.token)
        for top_id, top_token, top_lp in lp.top:
            entry.top_logprobs.add(token_id=top_id, logprob=top_lp, token=top_token)
    return resp


def list_models_response(pb2: ModuleType, cards: Sequence[ModelCard]) -> Any:
    """A yard.v1.ListModelsResponse with the same models as /v1/models."""
    return pb2.ListModelsResponse(models=[
        pb2.ModelInfo(id=c.id, created=c.created, max_model_len=c.max_model_len or 0, owned_by=c.owned_by)
        for c in cards])
