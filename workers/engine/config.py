"""The engine tier's configuration, validated where it is made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from workers.engine.interface import BACKENDS
from workers.experts.policies import POLICIES as EXPERT_POLICIES
from workers.models.config import DTYPES
from workers.offload.config import AttentionOffloadConfig

if TYPE_CHECKING:
    from workers.engine.block_manager import BlockManager


@dataclass(frozen=True)
class EngineConfig:
    # The engine inside the worker: "yard" (ours) or "vllm" (vLLM's V1 engine, with
    # the `vllm` extra installed; workers/vllm/engine.py says what it supports).
    backend: str = "yard"
    model: str = "tiny-llama"  # a Hugging Face model directory or a tiny preset name
    dtype: Optional[str] = None  # None: the checkpoint's own
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory_gib: float = 1.0  # KV cache budget; num_kv_blocks overrides it
    num_kv_blocks: Optional[int] = None
    max_model_len: Optional[int] = None  # None: the model's max_position_embeddings
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    seed: int = 0  # for requests without a seed of their own
    kv_reservation_timeout_s: float = 30.0
    # "auto": the compiled CPU decode kernel where it applies (CPU, float32);
    # "torch": always the plain PyTorch attention.
    attention_backend: str = "auto"
    # Tensor parallelism: ranks 1..N-1 are Ray actors in one placement group; this
    # engine's process is rank 0. Collectives time out after tp_timeout_s.
    tensor_parallel_size: int = 1
    placement_strategy: str = "PACK"  # PACK, STRICT_PACK, SPREAD or STRICT_SPREAD
    tp_cpus_per_rank: float = 1.0
    tp_timeout_s: float = 30.0
    # Expert parallelism (MoE models): 1, or the tensor-parallel size, whose ranks then
    # hold whole experts by a placement table (workers/models/expert_parallel.py).
    expert_parallel_size: int = 1
    # "contiguous", or a placement table's JSON file (`yard experts --json`'s "table").
    expert_placement: str = "contiguous"
    expert_slots_per_rank: Optional[int] = None  # None: experts / expert_parallel_size (no replicas)
    # Live re-placement from the last minute's routing: its policy (contiguous, balanced,
    # affinity, combined), and every how many steps it runs by itself (None: only on demand).
    expert_replacement_policy: str = "combined"
    expert_replacement_every_steps: Optional[int] = None
    # Attention offloading: {workers: K, ...} (workers/offload/config.py), or None.
    attention_offload: Optional[Any] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_offload", AttentionOffloadConfig.parse(self.attention_offload))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "vllm":
            self._check_vllm()
        offload = self.attention_offload
        if offload is not None and self.expert_parallel_size > 1:
            raise ValueError(f"attention_offload with expert_parallel_size {self.expert_parallel_size}: offloading "
                             f"and expert parallelism do not run together yet")
        if offload is not None and offload.workers % self.tensor_parallel_size:
            raise ValueError(f"attention_offload.workers {offload.workers} must be a multiple of "
                             f"tensor_parallel_size {self.tensor_parallel_size}: each rank sends its heads to "
                             f"attention workers of its own")
        if self.attention_backend not in ("auto", "torch"):
            raise ValueError(f"attention_backend must be 'auto' or 'torch', got {self.attention_backend!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.placement_strategy not in ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, STRICT_PACK, SPREAD or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        for name in ("tp_cpus_per_rank", "tp_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            _positive_int(name, getattr(self, name))
        _positive_int("expert_parallel_size", self.expert_parallel_size)
        if self.expert_parallel_size not in (1, self.tensor_parallel_size):
            raise ValueError(f"expert_parallel_size must be 1 or tensor_parallel_size "
                             f"({self.tensor_parallel_size}): experts are sharded over the tensor-parallel "
                             f"ranks; got {self.expert_parallel_size}")
        if self.expert_replacement_policy not in EXPERT_POLICIES:
            raise ValueError(f"expert_replacement_policy must be one of {list(EXPERT_POLICIES)}, "
                             f"got {self.expert_replacement_policy!r}")
        for name in ("num_kv_blocks", "max_model_len", "expert_slots_per_rank", "expert_replacement_every_steps"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if not self.kv_reservation_timeout_s > 0:
            raise ValueError(f"kv_reservation_timeout_s must be > 0, got {self.kv_reservation_timeout_s}")
        if (not self.enable_chunked_prefill and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len):
            # Without chunking a prompt must fit into one step's budget.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when enable_chunked_prefill is off")

    def _check_vllm(self) -> None:
        """Settings that only yard's engine has are refused by name, not ignored."""
        defaults = EngineConfig()
        for name in VLLM_UNSUPPORTED:
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"{name} is not supported with backend 'vllm' (got {getattr(self, name)!r})")


# What a vLLM worker cannot honour: yard's own mechanisms.
VLLM_UNSUPPORTED = ("num_kv_blocks", "attention_backend", "expert_parallel_size", "expert_placement",
                    "expert_slots_per_rank", "expert_replacement_every_steps", "attention_offload")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def max_model_len(config: EngineConfig, max_position_embeddings: int, blocks: "BlockManager") -> tuple[int, str]:
    """The longest sequence (prompt and output) this instance can ever run, and what
    sets it. A longer one could never be scheduled: without chunked prefill a
    sequence is prefilled (or recomputed after a preemption) in one step, so it must
    fit the step's token budget; and it must fit the KV cache above the watermark."""
    bounds = {"the model's max_position_embeddings": max_position_embeddings,
              "usable KV cache blocks x block_size": (blocks.num_blocks - blocks.watermark_blocks) * blocks.block_size}
    if config.max_model_len is not None:
        bounds["max_model_len"] = config.max_model_len
    if not config.enable_chunked_prefill:
        bounds["max_num_batched_tokens, as enable_chunked_prefill is off"] = config.max_num_batched_tokens
    bound = min(bounds, key=bounds.__getitem__)
    return bounds[bound], bound
