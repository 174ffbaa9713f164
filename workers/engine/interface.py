"""What a worker needs of its engine, whichever engine it is: yard's own
(workers/engine/engine.py) or vLLM's (workers/vllm/engine.py).

The worker's stepping thread is the only caller. It adds and aborts requests,
steps, turns each step's outputs into events, asks for a load report between
steps, and checks health. What else an engine can do (move a request's KV, place
experts) it says in its capabilities, and the worker and the manager ask only what
those allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence as Seq

if TYPE_CHECKING:
    from workers.engine.config import EngineConfig
    from workers.engine.outputs import EngineStats, StepOutput
    from workers.load_report import KVLoad
    from workers.sampling_params import SamplingParams

BACKENDS = ("yard", "vllm")


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    backend: str  # one of BACKENDS
    # Live migration and prefill/decode handoff with the KV cache, in and out.
    kv_migration: bool
    expert_placement: bool  # live expert re-placement (expert parallelism)


YARD_CAPABILITIES = EngineCapabilities("yard", kv_migration=True, expert_placement=True)


class WorkerEngine(Protocol):
    """The calls workers/worker.py makes on an engine; all on its stepping thread."""

    capabilities: EngineCapabilities
    max_model_len: int

    @property
    def healthy(self) -> bool: ...

    @property
    def health_error(self) -> Optional[str]: ...

    @property
    def num_steps(self) -> int: ...

    @property
    def stepped(self) -> bool: ...  # the last step ran a forward (else nothing was ready)

    def add_request(self, request_id: str, prompt_token_ids: Seq[int], params: "SamplingParams",
                    priority: int = 0, arrival_time: Optional[float] = None,
                    output_token_ids: Seq[int] = ()) -> None:
        """Raises ValueError naming the field if the request can never run here;
        output_token_ids resumes a request that produced them elsewhere."""

    def abort(self, request_id: str) -> bool: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self, before_forward: Optional[Callable[[], None]] = None) -> list["StepOutput"]: ...

    def fail(self, error: str) -> list["StepOutput"]:
        """End every request with finish_reason "error"; the engine is unhealthy after."""

    def check_helpers(self) -> list["StepOutput"]:
        """Fail everything if a process the engine depends on has ended (else [])."""

    def expire_reservations(self) -> list[str]: ...

    def stats(self) -> "EngineStats": ...

    def kv_load(self, max_hashes: int) -> "KVLoad": ...

    def handover_layout(self) -> Any: ...  # KV a request moved by recompute may bring (vLLM's), or None

    def shutdown(self) -> None: ...


def make_engine(config: "EngineConfig") -> WorkerEngine:
    """The engine that config.backend names."""
    if config.backend == "vllm":
        from workers.vllm.engine import VLLMEngine

        return VLLMEngine(config)
    from workers.engine.engine import LLMEngine

    return LLMEngine(config)
