"""Ray Serve LLM (`ray.serve.llm.build_openai_app`, vLLM inside one replica) on a
loopback port, in a local Ray of its own, until SIGTERM. Run with the interpreter of
`.venv-peers` (vLLM's CPU build, Ray Serve and pyarrow; `make peers`):

    .venv-peers/bin/python bench/peers/ray_serve_llm.py MODEL_DIR NAME PORT

It serves MODEL_DIR as NAME on 127.0.0.1:PORT/v1, float32 and eager like `vllm serve`
in bench/serving.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def main() -> None:
    model_dir, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Its Ray workers at nice 0, as yard's (cluster/serve_env.py) and vllm serve's
    # processes: on this machine every server stands equal to the client beside it.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    # Logical CPUs oversubscribed as for ours (bench/serving.py --ray-cpus): its ingress
    # replica and its engine replica each ask for one.
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    # A CPU bundle: Ray Serve LLM asks for a GPU unless its placement says otherwise.
    config = LLMConfig(model_loading_config={"model_id": name, "model_source": model_dir},
                       engine_kwargs={"dtype": "float32", "enforce_eager": True},
                       placement_group_config={"bundles": [{"CPU": 1}]},
                       deployment_config={"num_replicas": 1})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
