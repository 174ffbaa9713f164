"""Attention offloading on CUDA: the model worker and two attention workers on the GPU,
the per-layer vectors staged through host memory for gloo. The same greedy tokens, and
logprobs within 1e-4, as the plain engine on CUDA, with one micro-batch and with two.

The attention workers run as plain processes here, not Ray actors (the GPU machines
these run on have no Ray): the same AttentionWorker, link and process group as the
actors use; only the starting differs. Skipped where there is no CUDA (CI); run on a
GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import multiprocessing
import random
from typing import Optional

import pytest
import torch

import workers.engine.engine as engine_module
from workers import LLM, SamplingParams
from workers.engine.engine import LLMEngine
from workers.offload.attention_worker import AttentionWorker
from workers.offload.commands import StopAttending
from workers.offload.heads import rank_shards
from workers.offload.link import OffloadLink
from workers.parallel.group import join_group, open_store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HOST, TIMEOUT_S = "127.0.0.1", 120.0
PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
ENGINE_ARGS = dict(device="cuda", max_num_batched_tokens=32, enable_prefix_caching=True, block_size=8,
                   num_kv_blocks=40)


def _serve_attention(rank: int, size: int, shard, num_layers: int, num_blocks: int, block_size: int,
                     head_dim: int, device: str, port: int) -> None:
    worker = AttentionWorker(rank, size, shard, num_layers, num_blocks, block_size, head_dim, "float32", device,
                             TIMEOUT_S)
    worker.join(HOST, port)
    worker.serve()


class ProcessAttentionWorkers:
    """What the engine uses of OffloadExecutor, with processes for the actors."""

    def __init__(self, config, cfg, num_blocks: int, block_size: int, device: str) -> None:
        self.shards = rank_shards(cfg.num_heads, cfg.num_kv_heads, config.workers)
        size = len(self.shards) + 1
        store = open_store(HOST, size, TIMEOUT_S)
        spawn = multiprocessing.get_context("spawn")
        self.processes = [spawn.Process(target=_serve_attention, args=(
            j + 1, size, shard, cfg.num_layers, num_blocks, block_size, cfg.head_dim, device, store.port))
            for j, shard in enumerate(self.shards)]
        for process in self.processes:
            process.start()
        self.link = OffloadLink(join_group(store, HOST, store.port, 0, size, TIMEOUT_S), self.shards)
        self.micro_batches = config.micro_batches

    def runner_args(self) -> dict:
        return {"offload": self.link, "offload_micro_batches": self.micro_batches}  # no migration here

    def check_workers(self) -> Optional[str]:
        ended = [p.pid for p in self.processes if not p.is_alive()]
        return f"attention processes {ended} ended" if ended else None

    def shutdown(self) -> None:
        self.link.group.broadcast_object(StopAttending())
        for process in self.processes:
            process.join(timeout=30)


def prompts() -> list[list[int]]:
    # test_attention_offload.py's prompts, not imported: that module needs Ray.
    rng = random.Random(21)
    shared = [rng.randrange(4, 1000) for _ in range(34)]  # a prefix-cache hit on the second pass
    return [shared + [rng.randrange(4, 1000) for _ in range(n)] for n in (3, 45)] + \
           [[rng.randrange(4, 1000) for _ in range(n)] for n in (9, 70, 1, 30)]


def generate(llm: LLM) -> list:
    return llm.generate(prompts(), PARAMS) + llm.generate(prompts(), PARAMS)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_offloaded_attention_on_cuda_matches_the_plain_engine(make_model, monkeypatch, micro_batches):
    model = str(make_model("tiny-llama"))
    with LLM(model=model, **ENGINE_ARGS) as llm:
        reference = generate(llm)
    monkeypatch.setattr(engine_module, "adopt_worker_group", lambda layout: None)  # no Ray, no placement group
    monkeypatch.setattr(LLMEngine, "_start_attention_workers", lambda self, mc, num_blocks, group, bundles:
                        ProcessAttentionWorkers(self.config.attention_offload, mc, num_blocks, self.config.block_size,
                                                self.config.device))
    offload = {"workers": 2, "micro_batches": micro_batches}
    with LLM(model=model, attention_offload=offload, **ENGINE_ARGS) as llm:
        got = generate(llm)
        runner = llm.engine.runner
        assert runner.kv_caches.numel() == 0 and runner.offload.traffic.layer_calls > 0
        assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.blocks.prefix_hit_tokens > 0
    for a, b in zip(got, reference, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top_logprobs, y.top_logprobs)) <= 1e-4
