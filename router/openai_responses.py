"""OpenAI response bodies: completions, chat completions, their SSE chunks, models.

Shapes follow OpenAI's API (and vLLM's additions: `stop_reason` on each choice).
Builders are pure functions of their arguments (id, created and model are passed
in) so tests compare exact JSON. `StreamEncoder` holds the little state a stream
needs: whether the chat role chunk went out, and the completion text offset for
logprobs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from router.openai_errors import APIError
from router.openai_protocol import Kind

SSE_DONE = "data: [DONE]\n\n"

StopReason = Union[int, str, None]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: Optional[int] = None  # prompt tokens served from the prefix cache

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens,
                               "completion_tokens": self.completion_tokens,
                               "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.cached_tokens is not None:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One output token with its logprob and the top alternatives, highest first,
    as (token id, token text, logprob); texts are decoded by the router."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    created: int
    max_model_len: Optional[int] = None
    owned_by: str = "yard"


def new_id(kind: Kind) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


# ---------------------------------------------------------------------------- logprobs


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """/v1/completions logprobs: parallel arrays. `text_offset` is where the first
    token starts in the whole completion text (non-zero for later stream chunks).
    top_logprobs holds the sampled token too, as vLLM does (up to logprobs + 1)."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{e.token: e.logprob, **{t: lp for _, t, lp in e.top}} for e in entries],
        "text_offset": offsets,
    }


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """/v1/chat/completions logprobs: one object per token in `content`."""
    return {"content": [
        {**_chat_token(e.token, e.logprob), "top_logprobs": [_chat_token(t, lp) for _, t, lp in e.top]}
        for e in entries
    ]}


# ---------------------------------------------------------------------------- whole bodies


def completion_body(request_id: str, model: str, created: int, text: str, finish_reason: Optional[str],
                    usage: Usage, *, logprobs: Optional[Sequence[TokenLogprob]] = None,
                    stop_reason: StopReason = None) -> dict[str, Any]:
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text,
                     "logprobs": None if logprobs is None else completion_logprobs(logprobs),
                     "finish_reason": finish_reason, "stop_reason": stop_reason}],
        "usage": usage.body(),
    }


def chat_body(request_id: str, model: str, created: int, text: str, finish_reason: Optional[str],
              usage: Usage, *, logprobs: Optional[Sequence[TokenLogprob]] = None,
              stop_reason: StopReason = None) -> dict[str, Any]:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None if logprobs is None else chat_logprobs(logprobs),
                     "finish_reason": finish_reason, "stop_reason": stop_reason}],
        "usage": usage.body(),
    }


def merge_choices(bodies: Sequence[dict[str, Any]], usage: Usage) -> dict[str, Any]:
    """One response of n choices from n one-choice bodies (choice i from bodies[i])."""
    return {**bodies[0], "choices": [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)],
            "usage": usage.body()}


def models_body(cards: Iterable[ModelCard]) -> dict[str, Any]:
    """/v1/models."""
    data = []
    for c in cards:
        entry: dict[str, Any] = {"id": c.id, "object": "model", "created": c.created,
                                 "owned_by": c.owned_by}
        if c.max_model_len is not None:
            entry["max_model_len"] = c.max_model_len
        data.append(entry)
    return {"object": "list", "data": data}


# ---------------------------------------------------------------------------- streams


@dataclass(slots=True)
class StreamEncoder:
    """The SSE lines of one streamed response.

    Completions: one chunk per delta; chat: a first chunk with the role, then
    content deltas. The chunk with finish_reason is followed, when include_usage,
    by a chunk with empty choices and the usage (every earlier chunk then carries
    "usage": null, as OpenAI's do), and always by `data: [DONE]`.
    """

    kind: Kind
    request_id: str
    model: str
    created: int
    include_usage: bool = False
    index: int = 0  # the choice this encoder writes (n > 1: one encoder per choice)
    _role_sent: bool = False
    _text_offset: int = 0

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        obj = {"id": self.request_id,
               "object": "text_completion" if self.kind == "completion" else "chat.completion.chunk",
               "created": self.created, "model": self.model, "choices": [choice]}
        if self.include_usage:
            obj["usage"] = None
        return obj

    def _choice(self, text: str, logprobs: Optional[Sequence[TokenLogprob]],
                finish_reason: Optional[str], stop_reason: StopReason) -> dict[str, Any]:
        if self.kind == "completion":
            lp = None if logprobs is None else completion_logprobs(logprobs, self._text_offset)
            self._text_offset += len(text)
            return {"index": self.index, "text": text, "logprobs": lp,
                    "finish_reason": finish_reason, "stop_reason": stop_reason}
        delta = {"content": text} if text or finish_reason is None else {}
        return {"index": self.index, "delta": delta,
                "logprobs": None if logprobs is None else chat_logprobs(logprobs),
                "finish_reason": finish_reason, "stop_reason": stop_reason}

    def start(self) -> list[str]:
        """Lines to send as soon as the request is accepted (chat: the role)."""
        if self.kind != "chat" or self._role_sent:
            return []
        self._role_sent = True
        return [sse(self._chunk({"index": self.index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}))]

    def delta(self, text: str, logprobs: Optional[Sequence[TokenLogprob]] = None) -> list[str]:
        """Lines for new output text (nothing when there is neither text nor logprobs:
        a token can end inside a UTF-8 character or a possible stop string)."""
        if not text and not logprobs:
            return []
        return self.start() + [sse(self._chunk(self._choice(text, logprobs, None, None)))]

    def finish(self, finish_reason: str, usage: Usage, *, text: str = "",
               logprobs: Optional[Sequence[TokenLogprob]] = None,
               stop_reason: StopReason = None) -> list[str]:
        """The last lines: the finishing chunk (with any last text), the usage chunk
        when asked for, and [DONE]."""
        return self.finish_choice(finish_reason, text=text, logprobs=logprobs, stop_reason=stop_reason) + \
            self.end(usage)

    def finish_choice(self, finish_reason: str, *, text: str = "",
                      logprobs: Optional[Sequence[TokenLogprob]] = None, stop_reason: StopReason = None) -> list[str]:
        """This choice's finishing chunk (with any last text)."""
        return self.start() + [sse(self._chunk(self._choice(text, logprobs, finish_reason, stop_reason)))]

    def end(self, usage: Usage) -> list[str]:
        """After every choice finished: the usage chunk when asked for, and [DONE]."""
        lines = []
        if self.include_usage:
            lines.append(sse({"id": self.request_id,
                              "object": "text_completion" if self.kind == "completion" else "chat.completion.chunk",
                              "created": self.created, "model": self.model, "choices": [],
                              "usage": usage.body()}))
        lines.append(SSE_DONE)
        return lines

    def error(self, err: APIError) -> list[str]:
        """A failure after the stream started: the status line is already sent, so the
        error goes in an event (as vLLM does), then [DONE]."""
        return [sse(err.body()), SSE_DONE]
