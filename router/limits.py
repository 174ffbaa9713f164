"""Per-request limits a deployment sets (router config), beyond the model's own:
the body's size, the prompt's tokens and the output's tokens. Each refusal names the
field, the value and the limit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from router.openai_errors import CONTENT_TOO_LARGE, APIError, bad_request
from router.openai_protocol import GenerateRequest
from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int
    max_prompt_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None

    def check_body_size(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise APIError(CONTENT_TOO_LARGE, f"the request body is over {self.max_body_bytes} bytes "
                           f"(router.max_body_bytes)", None, "invalid_request_error", "request_too_large")

    def check_prompt(self, gen: GenerateRequest, num_tokens: int) -> None:
        limit = self.max_prompt_tokens
        if limit is not None and num_tokens > limit:
            raise APIError(CONTENT_TOO_LARGE, f"{gen.prompt_param}: the prompt is {num_tokens} tokens; this "
                           f"service takes at most {limit} per request (router.max_prompt_tokens)",
                           gen.prompt_param, "invalid_request_error", "prompt_too_long")

    def cap_output(self, gen: GenerateRequest, sampling: SamplingParams) -> SamplingParams:
        """An explicit max_tokens over the limit is refused; a default one is capped."""
        limit = self.max_completion_tokens
        if limit is None or sampling.max_tokens <= limit:
            return sampling
        if gen.max_tokens is not None:
            raise bad_request(gen.max_tokens_param, f"{gen.max_tokens_param}: {gen.max_tokens} output tokens "
                              f"requested; this service gives at most {limit} per request "
                              f"(router.max_completion_tokens)")
        return dataclasses.replace(sampling, max_tokens=limit)


async def read_body(request: Any, limits: RequestLimits) -> bytes:
    """An HTTP request's body, refused (413) as soon as it passes the limit: a huge
    body is never held whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        limits.check_body_size(int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        limits.check_body_size(size)
        chunks.append(chunk)
    return b"".join(chunks)
