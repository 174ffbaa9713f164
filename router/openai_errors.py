"""Request errors in OpenAI's shape, and the one rule for their HTTP status.

Status rule (one per kind of mistake, so a client can tell them apart):

* 400 `invalid_request_error`: the request cannot be read as asked: malformed JSON,
  a body that is not an object, a required field missing or empty (`model`,
  `prompt`, `messages`), a field of the wrong JSON type, a feature yard does not
  serve (`n` > 1, `echo`, tools...), `max_tokens` that does not fit in the context.
* 422 `invalid_request_error`: a field of the right type whose value is out of its
  range (`temperature` -1, `top_p` 0, `logprobs` 50, `top_k` -5).
* 404 `model_not_found`: `model` names no served model.
* 413 `context_length_exceeded`: the prompt alone does not fit in max_model_len;
  413 `prompt_too_long` / `request_too_large`: over the deployment's own limits
  (router.max_prompt_tokens, router.max_body_bytes).
* 401 `invalid_api_key`: keys are configured and the request names none of them
  (router/auth.py); 403 `priority_not_allowed`: a priority the caller may not set.

OpenAI and vLLM answer 400 for both of the first two; 422 for out-of-range values
follows RFC 9110 (well-formed, understood, but unprocessable). The openai client
raises `BadRequestError` (400) and `UnprocessableEntityError` (422); neither is
retried. Every error names the offending field in `param` and, with its value, in
the message.

gRPC has no body: the same error becomes a status code (`grpc_code`) and the
message as details.
"""

from __future__ import annotations

import json
from typing import Any, Optional

BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
CONTENT_TOO_LARGE = 413
UNPROCESSABLE = 422
TOO_MANY_REQUESTS = 429
SERVICE_UNAVAILABLE = 503

# HTTP status → gRPC status code name (an attribute of grpc.StatusCode); kept as
# strings so this module does not import grpc.
_GRPC_CODES = {
    BAD_REQUEST: "INVALID_ARGUMENT",
    UNPROCESSABLE: "INVALID_ARGUMENT",
    UNAUTHORIZED: "UNAUTHENTICATED",
    FORBIDDEN: "PERMISSION_DENIED",
    CONTENT_TOO_LARGE: "INVALID_ARGUMENT",
    NOT_FOUND: "NOT_FOUND",
    TOO_MANY_REQUESTS: "RESOURCE_EXHAUSTED",
    SERVICE_UNAVAILABLE: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _default_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == TOO_MANY_REQUESTS:
        return "rate_limit_error"
    return "invalid_request_error"


def show(value: Any, limit: int = 80) -> str:
    """A client's value as JSON, cut short: error messages quote what was sent."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class APIError(Exception):
    """A request that fails alone, with an OpenAI error body and an HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _default_type(status)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); ours has more arguments than the message.
        # Ray pickles an exception raised in an actor or replica to re-raise it.
        return (APIError, (self.status, self.message, self.param, self.type, self.code))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    @property
    def grpc_code(self) -> str:
        """The grpc.StatusCode name for this error, e.g. "INVALID_ARGUMENT"."""
        if self.status in _GRPC_CODES:
            return _GRPC_CODES[self.status]
        return "INTERNAL" if self.status >= 500 else "INVALID_ARGUMENT"

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def bad_request(param: Optional[str], message: str, code: Optional[str] = None) -> APIError:
    return APIError(BAD_REQUEST, message, param, code=code)


def invalid_value(param: str, message: str) -> APIError:
    return APIError(UNPROCESSABLE, message, param)


def unavailable(message: str) -> APIError:
    """No worker could take or finish the request (503)."""
    return APIError(SERVICE_UNAVAILABLE, message, None, "service_unavailable", "no_worker")


def worker_failure(event: Any) -> APIError:
    """The API error for a worker's Failed event: the request's own bad input (400),
    or the cluster's failure (503)."""
    if event.code == "invalid_request":
        return APIError(BAD_REQUEST, event.message, None, "invalid_request_error", event.code)
    return unavailable(event.message)


def model_not_found(model: str, served: list[str]) -> APIError:
    return APIError(NOT_FOUND,
                    f"model: the model {show(model)} does not exist; served: {show(sorted(served))}",
                    "model", code="model_not_found")
