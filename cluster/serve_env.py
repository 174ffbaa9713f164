"""Ray Serve settings for a streaming data path, as environment variables.

Serve reads these when its processes start, so they must be in the environment of
every Ray process: `yard serve` and the tests set them before starting a local Ray;
for `ray start` or KubeRay, put them in that environment (deploy/ does).

Measured on 2 cores (bench/serving.py, docs/config.md): they cut the time to first
token that the HTTP path adds over calling a worker directly from ~24 ms to ~11 ms
and raise saturated throughput through Serve by ~1.5x.
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
}


def apply_streaming_serve_env(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set each variable that is not set already (an operator's choice wins); returns
    the values in effect."""
    for name, value in STREAMING_SERVE_ENV.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in STREAMING_SERVE_ENV}
