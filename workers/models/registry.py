"""From a model directory to a loaded model: architecture name → class."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

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
               tp: Optional[TPGroup] = None) -> tuple[ModelConfig, LlamaForCausalLM]:
    """The model, or with `tp` this rank's shard of it."""
    cfg = load_model_config(model_dir, dtype)
    with torch.device(device):
        model = MODEL_CLASSES[cfg.architecture](cfg, tp)
    with CheckpointFiles(model_dir) as files:
        model.load_weights(files)
    model.pack()
    return cfg, model.eval()
