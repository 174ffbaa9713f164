"""llama-100m with 8,192 positions, for benchmarks whose contexts reach 8k (the preset
has 2,048): made once in the model cache, then loaded like any model directory."""

from __future__ import annotations

from pathlib import Path

POSITIONS = 8192


def long_context_model() -> Path:
    from workers.models.tiny import FORMAT_VERSION, cache_root, make_tiny_model

    path = cache_root() / f"llama-100m-{POSITIONS}pos-seed0-v{FORMAT_VERSION}"
    if not (path / "config.json").is_file():
        make_tiny_model("llama-100m", path, overrides={"max_position_embeddings": POSITIONS})
    return path
