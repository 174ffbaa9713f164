"""Live migration between two engines on CUDA: the KV leaves the device through
pinned host memory and lands in the other engine's device cache, exactly. Skipped
where there is no CUDA (CI); run on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from test_migration_engine import Run, busy_destination, migrate, undisturbed
from workers import SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_migration_on_cuda_is_exact(make_model):
    config = EngineConfig(model=str(make_model("tiny-llama")), device="cuda", block_size=8)
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=48, ignore_eos=True)
    tokens = list(range(10, 55))
    want = undisturbed(config, tokens, params)
    source, dest = LLMEngine(config), busy_destination(config)
    assert source.read_kv([0]).is_pinned()  # staged through pinned host memory
    source.add_request("r", tokens, params)
    run = Run()
    while len(run.tokens) < 9:
        run.take(source.step(), "r")
    migrate(source, dest, "r", run)  # checks every migrated block's K and V on the device
    while "r" in dest.requests:
        run.take(dest.step(), "r")
    assert run.tokens == want.tokens and run.text == want.text
