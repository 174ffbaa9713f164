"""The model's shape, read from a Hugging Face `config.json`.

Only the fields the engine needs are kept; each architecture's defaults follow what
transformers assumes when a field is missing, so real checkpoints load unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # a router reads configs too, and does not import torch
    import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
)

DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes


class ModelConfigError(ValueError):
    """config.json is missing, unreadable or describes a model we cannot run."""


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[RopeScaling]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    num_experts: int  # 0 for dense models
    num_experts_per_token: int
    dtype_name: str  # one of DTYPES
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]

    @property
    def dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def load_model_config(model_dir: Path, dtype: Optional[str] = None) -> ModelConfig:
    """Read `model_dir/config.json`; `dtype` overrides the checkpoint's own."""
    raw, path = _read_config(model_dir)
    return parse_model_config(raw, dtype, source=str(path))


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype the checkpoint declares (one of DTYPES), whatever its architecture."""
    raw, path = _read_config(model_dir)
    return _dtype(raw.get("dtype") or raw.get("torch_dtype") or "float32", str(path))


def _read_config(model_dir: Path) -> tuple[dict[str, Any], Path]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text()), path
    except FileNotFoundError:
        raise ModelConfigError(f"no config.json in model directory {model_dir}") from None
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None


def parse_model_config(raw: dict[str, Any], dtype: Optional[str], source: str) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelConfigError(
            f"{source}: unsupported architectures {archs}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    if raw.get("sliding_window") and raw.get("use_sliding_window", arch != "Qwen2ForCausalLM"):
        raise ModelConfigError(f"{source}: sliding_window={raw['sliding_window']} is not supported")
    if raw.get("mlp_bias"):
        raise ModelConfigError(f"{source}: mlp_bias=true is not supported")
    hidden = _required(raw, "hidden_size", source)
    heads = _required(raw, "num_attention_heads", source)
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ModelConfigError(
            f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
        architecture=arch,
        vocab_size=_required(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_required(raw, "intermediate_size", source),
        num_layers=_required(raw, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw),
        rope_scaling=_rope_scaling(raw, source),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        # Qwen2 always has q/k/v biases and none on o_proj; Llama's attention_bias
        # puts one on all four.
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        o_bias=arch != "Qwen2ForCausalLM" and bool(raw.get("attention_bias", False)),
        num_experts=raw.get("num_local_experts", 0) if arch == "MixtralForCausalLM" else 0,
        num_experts_per_token=raw.get("num_experts_per_tok", 2),
        dtype_name=_dtype(dtype or raw.get("dtype") or raw.get("torch_dtype") or "float32", source),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _required(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw:
        raise ModelConfigError(f"{source}: missing required field {key!r}")
    return raw[key]


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 moved rope settings into `rope_parameters`; older files use
    # `rope_theta` and `rope_scaling` at the top level.
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_theta(raw: dict[str, Any]) -> float:
    return float(_rope_params(raw).get("rope_theta", raw.get("rope_theta", 10000.0)))


def _rope_scaling(raw: dict[str, Any], source: str) -> Optional[RopeScaling]:
    params = _rope_params(raw)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )
    raise ModelConfigError(f"{source}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def _dtype(name: Any, source: str) -> str:
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ModelConfigError(f"{source}: dtype {name!r} is not one of {sorted(DTYPES)}")
    return key
