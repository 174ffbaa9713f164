"""Stop conditions, logprobs, chat and dtypes through the offline API on a real model."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers import LLM, SamplingParams


@pytest.fixture(scope="module")
def llama_dir(make_model):
    return make_model("tiny-llama")


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir))


PROMPT = "The quick brown fox"


def test_stop_string_cuts_text_and_reports_it(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    stop = free.text[12:16]  # a stop string taken from the undisturbed output
    first = free.text.index(stop)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:first]
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0]
    assert kept.text == free.text[:first + len(stop)]
    # The tokens are the undisturbed run's, up to the one that completed the stop.
    assert out.token_ids == free.token_ids[:len(out.token_ids)]


def test_stop_token_and_eos(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    target = free.token_ids[6]
    first = free.token_ids.index(target)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[target]))[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", target)
    assert out.token_ids == free.token_ids[:first + 1]
    # With the token declared the model's EOS, generation stops there without stop_reason.
    llm.engine.eos_token_ids = frozenset({target})
    try:
        eos = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40))[0]
    finally:
        llm.engine.eos_token_ids = frozenset(llm.engine.model_config.eos_token_ids)
    assert (eos.finish_reason, eos.stop_reason) == ("stop", None)
    assert eos.token_ids == free.token_ids[:first + 1]


def test_logprobs_equal_transformers_log_softmax(llm, llama_dir):
    rng = random.Random(4)
    prompt = [rng.randrange(4, 1000) for _ in range(30)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3))[0]
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + out.token_ids])).logits[0]
    reference = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token_id == token
        assert abs(lp.logprob - reference[i, token].item()) < 1e-4
        top = reference[i].topk(3)
        assert [t for t, _ in lp.top_logprobs] == top.indices.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top_logprobs, top.values.tolist())) < 1e-4
        assert lp.top_logprobs[0][0] == token  # greedy picks the top token


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "What is a KV cache?"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s><|user|>\nWhat is a KV cache?</s>\n<|assistant|>\n")
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert out.prompt_token_ids.count(llm.tokenizer.bos_token_id) == 1
    assert len(out.token_ids) == 8
    with pytest.raises(ValueError, match="messages must not be empty"):
        llm.chat([], SamplingParams())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_follow_float32(make_model, dtype):
    model_dir = make_model("tiny-llama", dtype=dtype)
    half = LLM(model=str(model_dir))
    assert half.engine.model_config.dtype == getattr(torch, dtype)
    assert half.engine.runner.kv_caches.dtype == getattr(torch, dtype)
    full = LLM(model=str(model_dir), dtype="float32")
    prompt = [[random.Random(9).randrange(4, 1000) for _ in range(20)]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    a, b = half.generate(prompt, params)[0], full.generate(prompt, params)[0]
    assert len(a.token_ids) == 16
    # Same weights (rounded once): the first token's logprob agrees to half precision.
    assert a.token_ids[0] == b.token_ids[0]
    assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 0.1
