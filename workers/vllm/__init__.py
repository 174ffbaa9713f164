"""vLLM's V1 engine inside a yard worker (EngineConfig.backend "vllm"): the adapter
that makes it a WorkerEngine (workers/engine/interface.py). Needs the `vllm` extra."""
