"""From a model directory to a loaded model: architecture name → class."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from workers.experts.table import PlacementTable
from workers.models.config import ModelConfig, load_model_config
from workers.models.llama import LlamaForCausalLM
from workers.models.mixtral import MixtralForCausalLM
from workers.models.weights import CheckpointFiles
from workers.parallel.group import TPGroup

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def load_model(model_dir: Path, dtype: Optional[str] = None, device: str = "cpu",
               tp: Optional[TPGroup] = None,
               placement: Optional[PlacementTable] = None) -> tuple[ModelConfig, LlamaForCausalLM]:
    """The model, or with `tp` this rank's shard of it; with `placement` (a MoE model)
    its experts run expert-parallel over tp's ranks."""
    cfg = load_model_config(model_dir, dtype)
    with torch.device(device):
        if placement is None:
            model = MODEL_CLASSES[cfg.architecture](cfg, tp)
        elif not cfg.is_moe:
            raise ValueError(f"expert_parallel_size > 1 needs a mixture-of-experts model; {model_dir.name} "
                             f"({cfg.architecture}) has no experts")
        else:
            model = MODEL_CLASSES[cfg.architecture](cfg, tp, placement)
    with CheckpointFiles(model_dir) as files:
        model.load_weights(files)
    model.pack()
    return cfg, model.eval()
