"""transformers' batched `generate` on the engine benchmark's workload.

The baseline most people already have: AutoModelForCausalLM, left padding, greedy,
a fixed number of new tokens, the default dynamic KV cache.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def run_hf(model_dir: Path, prompts: list[list[int]], output_len: int, batch_size: int,
           warmup_prompts: int = 4) -> dict[str, Any]:
    """Generate exactly `output_len` greedy tokens per prompt; time the whole set."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    cfg = model.config
    pad_id = cfg.pad_token_id
    if pad_id is None:
        eos = cfg.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    # No EOS at all, rather than min_new_tokens' EOS mask: every request runs to `n`
    # tokens and greedy picks the argmax the engines with ignore_eos pick (the mask
    # changes the choice whenever EOS is the argmax). generate() fills fields left
    # None in the config it is given from the model's own generation config, so the
    # EOS has to go from there.
    model.generation_config.eos_token_id = None

    def gen_config(n: int) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=pad_id, use_cache=True)

    def run(batch_prompts: list[list[int]], n: int) -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(0, len(batch_prompts), batch_size):
            chunk = batch_prompts[i:i + batch_size]
            ids, mask = _left_pad(chunk, pad_id)
            with torch.inference_mode():
                seqs = model.generate(input_ids=ids, attention_mask=mask,
                                      generation_config=gen_config(n))
            out.extend(seqs[:, ids.shape[1]:].tolist())
        return out

    warmup_s = 0.0
    if warmup_prompts > 0:
        start = time.perf_counter()
        run(prompts[:warmup_prompts], min(16, output_len))
        warmup_s = time.perf_counter() - start

    start = time.perf_counter()
    token_ids = run(prompts, output_len)
    wall_s = time.perf_counter() - start

    del model
    gc.collect()
    return {
        "wall_s": wall_s,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "token_ids": token_ids,
        "extra": {"batch_size": batch_size, "torch_threads": torch.get_num_threads()},
    }
