"""Ray Serve settings for a streaming data path, and Ray's worker niceness, as
environment variables.

Ray and Serve read these when its processes start, so they must be in the environment of
every Ray process: `yard serve` and the tests set them before starting a local Ray;
for `ray start` or KubeRay, put them in that environment (deploy/ does).

Two ingress modes (docs/config.md has the figures from bench/serving.py):
- proxy: Serve's HTTP and gRPC proxies take the traffic and stream it to the router
  replica. With the settings below, not Serve's defaults, the proxy hop is lighter.
- direct: the router replica itself listens on the HTTP and gRPC ports (Serve's
  direct ingress), one hop fewer for every streamed chunk; one router replica per
  node, since the ports are fixed. Serve's proxy still runs, on ports of its own.
"""

from __future__ import annotations

import os
from typing import MutableMapping

STREAMING_SERVE_ENV = {
    # The proxy talks to replicas over gRPC instead of Ray actor calls: each streamed
    # chunk skips an object-store round trip and a thread hand-off.
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # Replica code runs on the replica's own event loop, the proxy's router on the
    # proxy's: no cross-thread hop per message.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Access logs buffered, not flushed to disk on every request.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    # Ray starts its worker processes at nice 15, below every other process on the
    # node. Here those are the engine workers, router replicas and proxy: the whole
    # data path, which then yields the cores to any neighbour at nice 0 (a sidecar, a
    # load generator, another server). At 0 they take a fair share; Ray's own daemons
    # run at 0 as well. (docs/performance.md: median TTFT at saturation, 15 against 0.)
    "RAY_worker_niceness": "0",
}


def direct_ingress_env(http_port: int, grpc_port: int) -> dict[str, str]:
    """Serve's direct ingress with the router replica on exactly these ports."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # The allocator hands out [min, max): one port each, so a clash fails loudly.
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 1),
        # A replacement replica takes the port back at once (the quarantine exists
        # for an external HAProxy, which we do not run).
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # How long a stopping replica keeps serving so a load balancer can notice;
        # Serve's 30 s default suits a cloud load balancer, not a single node.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def apply_serve_env(env: dict[str, str], environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set each variable of `env` that is not set already (an operator's choice
    wins); returns the values in effect."""
    for name, value in env.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in env}

