"""The Ray Serve application: OpenAI-style HTTP in front of the worker fleet.

`build_app` is the import path for `serve run router.app:build_app`, `serve deploy`
and a KubeRay serveConfigV2. It makes sure the cluster manager (a named, detached
actor) is running, then binds the router deployment.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures.

import time
from typing import Any, AsyncIterator, Optional

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from cluster.config import ClusterConfig, config_changes
from cluster.sizing import DEFAULT_ROUTER_CPUS
from cluster.values import with_values_file
from router.config import MANAGER_NAMESPACE, RouterConfig
from router.core import Overloaded, RouterCore
from router.dispatch import NoWorkerAvailable
from router.choices import choice_requests, stream_choices
from router.grpc_ingress import GrpcIngress
from router.limits import read_body
from router.openai_errors import SERVICE_UNAVAILABLE, APIError, unavailable, worker_failure
from router.openai_protocol import GenerateRequest, parse_chat_request, parse_completion_request, parse_json
from router.openapi_schema import OPENAPI
from router.openai_responses import (ModelCard, StreamEncoder, Usage, chat_body, completion_body, merge_choices,
                                     models_body)
from workers.events import Failed, Finished, Tokens

api = FastAPI(title="yard")
api.openapi = lambda: OPENAPI  # FastAPI cannot see the fields of our raw-body endpoints


def _stream_lines(enc: StreamEncoder, event: Any, logprobs: Optional[list] = None) -> list[str]:
    """A Tokens or Failed event's lines (Finished ends a choice: _sse handles it)."""
    if isinstance(event, Tokens):
        return enc.delta(event.text, logprobs)
    return enc.error(worker_failure(event))


def _usage(event: Finished) -> Usage:
    u = event.usage
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def _total_usage(ends: list[Finished]) -> Usage:
    """n choices of one prompt: the prompt counts once, every choice's output counts."""
    first = ends[0].usage
    return Usage(first.prompt_tokens, sum(e.usage.completion_tokens for e in ends), first.cached_tokens)


# Defined after the helpers it calls: Serve captures the class when it is decorated.
@serve.deployment(name="router")
@serve.ingress(api)
class Router(GrpcIngress):
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.core = RouterCore(config)
        self.created = int(time.time())

    @api.get("/health")
    async def health(self) -> JSONResponse:
        self.core.ensure_refreshing()
        if not self.core.loads:  # a replica that just started has not pulled a snapshot yet
            await self.core.refresh()
        healthy = [w for w in self.core.loads.values() if w.healthy]
        status = 200 if healthy else SERVICE_UNAVAILABLE
        return JSONResponse({"status": "ok" if healthy else "no healthy worker",
                             "healthy_workers": len(healthy)}, status_code=status)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self.core.keys.caller(request.headers.get("authorization"))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        card = ModelCard(self.config.model_name, self.created, self.core.max_model_len)
        return JSONResponse(models_body([card]))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._serve(request, parse_completion_request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._serve(request, parse_chat_request)

    async def _serve(self, request: Request, parse: Any) -> Any:
        self.core.ensure_refreshing()
        if not self.core.loads:
            await self.core.refresh()
        try:
            caller = self.core.keys.caller(request.headers.get("authorization"))
            body = await read_body(request, self.core.limits)
            gen = parse(parse_json(body), [self.config.model_name])
            worker_request = await self.core.prepare(gen, request.headers.get("x-session-id"), caller)
        except Overloaded as e:
            self.core.refused(e)
            return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": str(e.retry_after_s)})
        except APIError as e:
            self.core.refused(e)
            return JSONResponse(e.body(), status_code=e.status)
        if gen.stream:
            return StreamingResponse(self._sse(gen, worker_request), media_type="text/event-stream")
        return await self._whole(gen, worker_request)

    async def _whole(self, gen: GenerateRequest, worker_request: Any) -> JSONResponse:
        n = gen.n
        texts, ends = [""] * n, [None] * n
        logprobs = [[] if worker_request.params.logprobs is not None else None for _ in range(n)]
        try:
            async for i, event in stream_choices(self.core, choice_requests(worker_request, n)):
                if isinstance(event, Tokens):
                    texts[i] += event.text
                    if logprobs[i] is not None:
                        logprobs[i] += self._logprobs(event) or []
                elif isinstance(event, Finished):
                    ends[i] = event
                elif isinstance(event, Failed):
                    err = worker_failure(event)
                    return JSONResponse(err.body(), status_code=err.status)
        except NoWorkerAvailable as e:
            return JSONResponse(unavailable(str(e)).body(), status_code=SERVICE_UNAVAILABLE)
        make = completion_body if gen.kind == "completion" else chat_body
        bodies = [make(worker_request.request_id, self.config.model_name, int(time.time()), texts[i], end.reason,
                       _usage(end), logprobs=logprobs[i], stop_reason=end.stop_reason) for i, end in enumerate(ends)]
        return JSONResponse(merge_choices(bodies, _total_usage(ends)) if n > 1 else bodies[0])

    async def _sse(self, gen: GenerateRequest, worker_request: Any) -> AsyncIterator[str]:
        created = int(time.time())
        encoders = [StreamEncoder(gen.kind, worker_request.request_id, self.config.model_name, created,
                                  include_usage=gen.include_usage, index=i) for i in range(gen.n)]
        # One chunk per event, however many SSE lines it makes: each chunk is a
        # message through Serve's proxy.
        for enc in encoders:
            for chunk in enc.start():
                yield chunk
        ends: list[Any] = [None] * gen.n
        try:
            want_logprobs = worker_request.params.logprobs is not None
            async for i, event in stream_choices(self.core, choice_requests(worker_request, gen.n)):
                logprobs = self._logprobs(event) if want_logprobs and isinstance(event, Tokens) else None
                if isinstance(event, Finished):
                    ends[i] = event
                    chunk = "".join(encoders[i].finish_choice(event.reason, stop_reason=event.stop_reason))
                    if all(ends):
                        chunk += "".join(encoders[0].end(_total_usage(ends)))
                else:
                    chunk = "".join(_stream_lines(encoders[i], event, logprobs))
                if chunk:  # a token may end inside a character: no text yet
                    yield chunk
                if isinstance(event, Failed):
                    return
        except NoWorkerAvailable as e:
            yield "".join(encoders[0].error(unavailable(str(e))))


def ensure_cluster(cluster: ClusterConfig) -> Any:
    """The cluster manager of this name, started (with its workers) if not yet running.
    A running one keeps the settings it started with: a redeploy that changes them
    fails here, naming them, rather than serve with the old ones unseen."""
    from cluster.manager import ClusterManager  # the engine's imports (torch): not in router replicas

    # Ray restarts a manager that dies, with the same settings; the new one adopts the
    # running workers, and routers serve on their last snapshot meanwhile. Calls made
    # while it restarts wait for it rather than fail.
    manager = ray.remote(ClusterManager).options(
        name=f"yard-manager-{cluster.name}", namespace=MANAGER_NAMESPACE, lifetime="detached",
        get_if_exists=True, max_restarts=-1, max_task_retries=-1, num_cpus=0).remote(cluster)
    changes = config_changes(ray.get(manager.get_config.remote()), cluster)
    if changes:
        raise ValueError(f"cluster {cluster.name!r} is already running with other settings "
                         f"({'; '.join(changes)}); a running cluster keeps its own. Stop it first "
                         f"(yard stop --cluster {cluster.name}), or deploy under another cluster.name")
    ray.get(manager.start.remote(), timeout=cluster.startup_timeout_s + 60)
    return manager


APP_ARGS = {"cluster", "router", "replicas", "router_cpus", "max_ongoing_requests"}


def build_app(args: Optional[dict[str, Any]] = None) -> serve.Application:
    """args: {"cluster": {...ClusterConfig...}, "router": {...RouterConfig...}, "replicas": n,
    "router_cpus": Ray CPUs per replica (0.5), "max_ongoing_requests": per replica (1024),
    "values_file": a YAML file of the same shape merged over these (cluster/values.py)}."""
    args = with_values_file(dict(args or {}))
    unknown = sorted(set(args) - APP_ARGS)
    if unknown:
        raise ValueError(f"unknown build_app args {unknown}; known: {sorted(APP_ARGS)}")
    cluster = ClusterConfig.from_dict(args.get("cluster", {}))
    router_args = dict(args.get("router", {}))
    router_args.setdefault("model", cluster.engine.model)
    router_args.setdefault("block_size", cluster.engine.block_size)
    router = RouterConfig(cluster_name=cluster.name, **router_args)
    ensure_cluster(cluster)
    # A replica streams many requests at once (it is async and mostly waits on
    # workers). Serve's default of 5 would queue the rest in front of the router,
    # where load shedding cannot see them.
    return Router.options(num_replicas=int(args.get("replicas", 1)),
                          max_ongoing_requests=int(args.get("max_ongoing_requests", 1024)),
                          ray_actor_options={"num_cpus": float(args.get("router_cpus", DEFAULT_ROUTER_CPUS))}
                          ).bind(router)
