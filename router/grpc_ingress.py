"""The yard.v1.Yard gRPC methods, mixed into the Serve ingress deployment.

Ray Serve's gRPC proxy calls the ingress replica's method named after the RPC
(`Generate`, `Health`, `ListModels`) with the request message and a
`grpc_context`. `Generate` is an async generator: one GenerateResponse per Tokens
event (start_index, token ids, text), the last with finish_reason, stop_reason and
usage.

Errors: the status goes on `grpc_context` (APIError.grpc_code: INVALID_ARGUMENT,
NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED when overloaded, UNAVAILABLE
when no worker can serve) with details naming the field. A streaming method must
then raise (Serve carries the code set on the context with the exception, which
must pickle); a unary one returns an empty response.

The mixin uses what `router.app.Router` sets up: `self.core` (RouterCore),
`self.config` (RouterConfig) and `self.created`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

import grpc

from router import grpc_stubs
from router.dispatch import NoWorkerAvailable
from router.grpc_protocol import from_proto, generate_response, list_models_response
from router.openai_errors import APIError, unavailable, worker_failure
from router.openai_protocol import check_prompt_token_ids
from router.auth import Caller
from router.openai_responses import ModelCard, TokenLogprob, Usage
from workers.events import Failed, Finished, Tokens

_stubs: Optional[grpc_stubs.Stubs] = None


def _pb2() -> Any:
    """The generated message module, loaded (and generated if need be) once per process."""
    global _stubs
    if _stubs is None:
        _stubs = grpc_stubs.load()
    return _stubs.pb2


def _details(err: APIError) -> str:
    if err.param and err.param not in err.message:
        return f"{err.param}: {err.message}"
    return err.message


def _set_status(grpc_context: Any, err: APIError) -> None:
    grpc_context.set_code(grpc.StatusCode[err.grpc_code])
    grpc_context.set_details(_details(err))


class GrpcIngress:
    """Generate, Health and ListModels for Ray Serve's gRPC proxy."""

    core: Any
    config: Any
    created: int

    async def _grpc_ready(self) -> None:
        self.core.ensure_refreshing()
        if not self.core.loads:
            await self.core.refresh()

    async def Generate(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: N802
        pb2 = _pb2()
        try:
            await self._grpc_ready()
            caller = self._caller(grpc_context)
            gen = from_proto(request, [self.config.model_name])
            if request.WhichOneof("prompt") == "token_ids":
                # Checked here too so that the details name the proto field.
                check_prompt_token_ids(gen.prompt, self.core.model_config.vocab_size, param="token_ids.ids")
            worker_request = await self.core.prepare(gen, gen.session_id, caller)
        except APIError as e:
            self.core.refused(e)
            _set_status(grpc_context, e)
            raise
        request_id = worker_request.request_id
        want_logprobs = worker_request.params.logprobs is not None
        next_index = 0
        try:
            async for event in self.core.stream(worker_request):
                if isinstance(event, Tokens):
                    logprobs = self._logprobs(event) if want_logprobs else None
                    yield generate_response(pb2, request_id, event.start_index, event.token_ids, event.text,
                                            logprobs=logprobs)
                    next_index = event.start_index + len(event.token_ids)
                elif isinstance(event, Finished):
                    # Its own message, with no tokens: holding back the last tokens
                    # until the worker says it finished would delay every one.
                    u = event.usage
                    yield generate_response(pb2, request_id, next_index, (), "",
                                            finish_reason=event.reason, stop_reason=event.stop_reason,
                                            usage=Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens))
                    return
                elif isinstance(event, Failed):
                    err = worker_failure(event)
                    _set_status(grpc_context, err)
                    raise err
        except NoWorkerAvailable as e:
            _set_status(grpc_context, unavailable(str(e)))
            raise

    def _caller(self, grpc_context: Any) -> Caller:
        """Who calls, from the `authorization` metadata (as HTTP's header)."""
        metadata = dict(grpc_context.invocation_metadata() or ())
        return self.core.keys.caller(metadata.get("authorization"))

    def _logprobs(self, event: Tokens) -> Optional[list[TokenLogprob]]:
        if event.logprobs is None:
            return None
        tok = self.core.tokenizer

        def text(token_id: int) -> str:
            return tok.decode([token_id])

        return [TokenLogprob(lp.token_id, text(lp.token_id), lp.logprob,
                             tuple((tid, text(tid), tlp) for tid, tlp in lp.top))
                for lp in event.logprobs]

    async def Health(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        pb2 = _pb2()
        try:
            await self._grpc_ready()
        except Exception:  # noqa: BLE001 - no snapshot yet: report not serving
            pass
        loads = list(self.core.loads.values())
        healthy = sum(1 for w in loads if w.healthy)
        status = pb2.HealthResponse.SERVING if healthy else pb2.HealthResponse.NOT_SERVING
        return pb2.HealthResponse(status=status, healthy_workers=healthy,
                                  total_workers=max(len(loads), len(self.core.handles)))

    async def ListModels(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802
        try:
            self._caller(grpc_context)
        except APIError as e:
            _set_status(grpc_context, e)
            raise
        card = ModelCard(self.config.model_name, self.created, self.core.max_model_len)
        return list_models_response(_pb2(), [card])
