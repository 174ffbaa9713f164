"""The step-level API: abort, stats, seeded sampling, bad input, resume (live
migration is in test_migration_engine.py)."""

from __future__ import annotations

import random

import pytest

from workers import LLM, SamplingParams
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(make_model):
    return make_model("tiny-llama")


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 1000) for _ in range(n)]


def collect(tokens: dict[str, list[int]], outputs, first_index: int = 0) -> None:
    for out in outputs:
        if out.finish_reason == "abort":
            assert out.new_token_ids == ()
            continue
        got = tokens.setdefault(out.request_id, [])
        assert out.start_index == first_index + len(got)  # absolute: no gap, no repeat
        got.extend(out.new_token_ids)


def run_to_end(engine: LLMEngine, tokens: dict[str, list[int]] | None = None,
               first_index: int = 0) -> dict[str, list[int]]:
    tokens = {} if tokens is None else tokens
    while engine.has_unfinished_requests():
        collect(tokens, engine.step(), first_index)
    return tokens


def test_abort_at_any_point_frees_every_block(llama_dir):
    engine = LLMEngine(EngineConfig(model=str(llama_dir), max_num_batched_tokens=32))
    total = engine.stats().num_free_blocks
    for i in range(4):
        engine.add_request(f"r{i}", prompt(i, 50), GREEDY)
    assert engine.abort("r3")  # still waiting
    tokens: dict[str, list[int]] = {}
    collect(tokens, engine.step())  # r0 is mid-prefill
    assert engine.abort("r0")
    for _ in range(5):
        collect(tokens, engine.step())
    assert engine.abort("r1")  # decoding
    assert not engine.abort("nope")
    run_to_end(engine, tokens)
    assert len(tokens["r2"]) == 40
    assert engine.stats().num_free_blocks == total
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_seeded_sampling_is_reproducible_across_runs_and_batches(llama_dir):
    llm = LLM(model=str(llama_dir))
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    unseeded = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    target = prompt(0, 30)
    alone = llm.generate([target], seeded)[0].token_ids
    again = llm.generate([target], seeded)[0].token_ids
    batch = llm.generate([prompt(1, 12), prompt(2, 70), target, prompt(3, 5)],
                         [unseeded, unseeded, seeded, unseeded])[2].token_ids
    other_seed = llm.generate([target], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99,
                                                       max_tokens=24, ignore_eos=True))[0].token_ids
    assert alone == again == batch
    assert alone != other_seed
    greedy = llm.generate([target], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids
    assert alone != greedy  # it really sampled


def test_too_long_prompt_fails_alone(llama_dir):
    llm = LLM(model=str(llama_dir), max_model_len=64)
    outs = llm.generate([prompt(0, 10), prompt(1, 64), prompt(2, 20)], GREEDY)
    assert outs[1].finish_reason == "error"
    assert "64 tokens" in outs[1].error and "max_model_len (64)" in outs[1].error
    assert [o.finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
    assert len(outs[0].token_ids) == 40
    # The room under max_model_len caps max_tokens: 20 + 44 = 64.
    assert len(outs[2].token_ids) == 40


@pytest.mark.parametrize("limits, bound", [
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=48), "max_num_batched_tokens"),
    (dict(num_kv_blocks=3), "KV cache"),
])
def test_a_sequence_that_could_never_be_scheduled_fails_alone(llama_dir, limits, bound):
    # 48 tokens: the step budget without chunking, or 3 blocks of 16. Unset
    # max_model_len used to leave such a prompt waiting at the queue's head forever.
    llm = LLM(model=str(llama_dir), **limits)
    assert llm.engine.max_model_len == 48 and bound in llm.engine.max_model_len_bound
    outs = llm.generate([prompt(0, 10), prompt(1, 60), prompt(2, 8)],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert outs[1].finish_reason == "error"
    assert "60 tokens" in outs[1].error and "max_model_len (48)" in outs[1].error and bound in outs[1].error
    assert [len(o.token_ids) for o in (outs[0], outs[2])] == [12, 12]


def test_bad_token_ids_and_request_ids_are_named(llama_dir):
    engine = LLMEngine(EngineConfig(model=str(llama_dir)))
    with pytest.raises(ValueError, match=r"prompt_token_ids holds 5000"):
        engine.add_request("a", [1, 5000], GREEDY)
    with pytest.raises(ValueError, match="prompt_token_ids must not be empty"):
        engine.add_request("b", [], GREEDY)
    engine.add_request("c", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="request_id 'c' is already"):
        engine.add_request("c", [1, 2, 3], GREEDY)


def test_resume_at_every_index_streams_the_same_text(llama_dir):
    """A request resumed elsewhere (output_token_ids) continues the undisturbed text
    exactly, wherever it was cut: held-back bytes and partial characters included."""
    engine = LLMEngine(EngineConfig(model=str(llama_dir)))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = prompt(8, 12)
    engine.add_request("full", tokens, params)
    steps = []
    while engine.has_unfinished_requests():
        steps.extend(o for o in engine.step() if o.new_token_ids)
    output = [t for o in steps for t in o.new_token_ids]
    for cut in range(1, len(output)):
        sent_text = "".join(o.new_text for o in steps[:cut])
        engine.add_request(f"resume-{cut}", tokens, params, output_token_ids=output[:cut])
        rest = []
        while engine.has_unfinished_requests():
            rest.extend(engine.step())
        assert [t for o in rest for t in o.new_token_ids] == output[cut:]
        assert sent_text + "".join(o.new_text for o in rest) == "".join(o.new_text for o in steps)
