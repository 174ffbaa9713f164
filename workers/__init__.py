"""yard's data plane: the engine, models and the offline API."""

from workers.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from workers.llm import LLM
        return LLM
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
