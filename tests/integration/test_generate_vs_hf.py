"""Greedy generation against transformers' generate, under every scheduling mode."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers import LLM, SamplingParams

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def make_prompts(seed: int, lengths: list[int], shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(4, 1000) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(4, 1000) for _ in range(n)] for n in lengths]


def hf_greedy(model_dir, prompts: list[list[int]], **generate_kwargs) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              **generate_kwargs)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def llama_dir(make_model):
    return make_model("tiny-llama")


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(1, [5, 17, 33, 64, 9, 120, 48, 2], shared_prefix=0)


@pytest.fixture(scope="module")
def shared_prompts():
    return make_prompts(2, [3, 20, 7, 41], shared_prefix=40)


@pytest.fixture(scope="module")
def expected(llama_dir, prompts, shared_prompts):
    return hf_greedy(llama_dir, prompts), hf_greedy(llama_dir, shared_prompts)


MODES = {
    "chunked+prefix": dict(),
    "no-chunking": dict(enable_chunked_prefill=False, max_num_batched_tokens=2048),
    "small-chunks": dict(max_num_batched_tokens=24),
    "no-prefix-cache": dict(enable_prefix_caching=False, max_num_batched_tokens=40),
    "block-size-4": dict(block_size=4, max_num_batched_tokens=64),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mixed_batch_matches_transformers(llama_dir, prompts, expected, mode):
    llm = LLM(model=str(llama_dir), **MODES[mode])
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected[0]
    assert all(o.finish_reason == "length" for o in outs)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_repetition_penalty_beside_plain_requests_matches_transformers(llama_dir, prompts, expected):
    """The penalty counts every prompt and output token of its own request, while the
    plain requests in the same batch are sampled without any (the engine hands the
    sampler a request's tokens only where its parameters read them)."""
    penalized = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=1.8)
    picked = prompts[:4]
    outs = LLM(model=str(llama_dir)).generate(prompts, [penalized] * 4 + [GREEDY] * (len(prompts) - 4))
    want = hf_greedy(llama_dir, picked, repetition_penalty=1.8)
    assert [o.token_ids for o in outs[:4]] == want
    assert want != expected[0][:4]  # the penalty changed the tokens: the check above has teeth
    assert [o.token_ids for o in outs[4:]] == expected[0][4:]


def test_prefix_cache_hits_keep_tokens_exact(llama_dir, shared_prompts, expected):
    llm = LLM(model=str(llama_dir), max_num_batched_tokens=64)
    first = llm.generate(shared_prompts[:1], GREEDY)
    rest = llm.generate(shared_prompts[1:], GREEDY)  # their 40-token prefix is cached now
    assert [o.token_ids for o in first + rest] == expected[1]
    blocks = llm.engine.blocks
    # Each later prompt reuses the two full 16-token blocks of the shared prefix.
    assert blocks.prefix_hit_tokens == 3 * 32
    again = llm.generate(shared_prompts, GREEDY)  # whole prompts cached: hits, same tokens
    assert [o.token_ids for o in again] == expected[1]
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks


def test_preemption_under_tiny_kv_budget_loses_nothing(llama_dir, prompts, expected):
    # 8 requests of up to 152 tokens; 16 blocks of 16 tokens cannot hold them all.
    llm = LLM(model=str(llama_dir), num_kv_blocks=16, max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected[0]
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == 16


@pytest.mark.parametrize("kind", ["tiny-qwen2", "tiny-moe"])
def test_other_architectures_generate_like_transformers(make_model, kind):
    model_dir = make_model(kind)
    prompts = make_prompts(3, [11, 30, 4])
    outs = LLM(model=str(model_dir), max_num_batched_tokens=32).generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts)
