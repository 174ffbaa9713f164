"""The batch limits a vLLM worker hands vLLM: yard's own on CPU, vLLM's defaults for
its device on a GPU unless the config names others. (vLLM resolves None for the
platform it runs on; this machine has no GPU to resolve it for.)"""

from __future__ import annotations

import pytest

from workers.engine.config import EngineConfig

pytest.importorskip("vllm")

from workers.vllm.engine import _engine_args  # noqa: E402  (needs the vllm extra)


@pytest.mark.parametrize("device, settings, want", [
    ("cpu", {}, (256, 2048)),
    ("cpu", {"max_num_seqs": 128}, (128, 2048)),
    ("cuda", {}, (None, None)),
    ("cuda", {"max_num_seqs": 512, "max_num_batched_tokens": 4096}, (512, 4096)),
    ("cuda", {"max_num_batched_tokens": 16384}, (None, 16384)),
], ids=["cpu", "cpu-set", "gpu", "gpu-set", "gpu-tokens-set"])
def test_batch_limits_by_device(make_model, device, settings, want):
    config = EngineConfig(backend="vllm", model=str(make_model("tiny-llama")), device=device, **settings)
    args = _engine_args(config, make_model("tiny-llama"))
    assert (args.max_num_seqs, args.max_num_batched_tokens) == want
