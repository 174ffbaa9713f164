"""The offline workload every system in bench/engine.py runs: random prompts.

Only the standard library, so a peer's interpreter (another venv, another numpy) can
import this file and rebuild exactly the same prompts from the same seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional


def random_prompts(vocab_size: int, num_prompts: int, prompt_len: int, seed: int,
                   avoid: tuple[int, ...] = ()) -> list[list[int]]:
    """`num_prompts` lists of `prompt_len` token ids drawn uniformly from the vocab.

    `avoid` (e.g. BOS/EOS/pad ids) is skipped so no system treats a prompt token as
    special. The same arguments give the same prompts in any Python.
    """
    if vocab_size <= len(set(avoid)):
        raise ValueError(f"vocab_size {vocab_size} leaves no ids once {avoid} are avoided")
    if num_prompts < 1 or prompt_len < 1:
        raise ValueError(f"need num_prompts >= 1 and prompt_len >= 1, "
                         f"got {num_prompts} and {prompt_len}")
    rng = random.Random(seed)
    skip = set(avoid)
    prompts = []
    for _ in range(num_prompts):
        ids: list[int] = []
        while len(ids) < prompt_len:
            t = rng.randrange(vocab_size)
            if t not in skip:
                ids.append(t)
        prompts.append(ids)
    return prompts


def special_ids(model_dir: Path) -> tuple[int, ...]:
    """BOS/EOS/pad ids named in the model's config.json (any may be a list or absent)."""
    cfg = read_config(model_dir)
    ids: list[int] = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        if isinstance(v, int):
            ids.append(v)
        elif isinstance(v, list):
            ids.extend(x for x in v if isinstance(x, int))
    return tuple(sorted(set(ids)))


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"no config.json in model directory {model_dir}") from None


def vocab_size(model_dir: Path) -> int:
    cfg = read_config(model_dir)
    v: Optional[int] = cfg.get("vocab_size")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    if not isinstance(v, int) or v < 2:
        raise SystemExit(f"{model_dir}/config.json has no usable vocab_size (got {v!r})")
    return v


def workload_prompts(model_dir: Path, num_prompts: int, prompt_len: int,
                     seed: int) -> list[list[int]]:
    """The benchmark's prompts for this model: what every system is given."""
    return random_prompts(vocab_size(model_dir), num_prompts, prompt_len, seed,
                          avoid=special_ids(model_dir))
