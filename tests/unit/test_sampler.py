import math
from collections import Counter

import pytest
import torch

from workers.engine.sampler import (
    SampledToken,
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    penalized_logits,
    seed_for_step,
)
from workers.sampling_params import SamplingParams


def row(output: list[int] | None = None, prompt: list[int] | None = None, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), prompt or [], output or [])


def hand_logits(probs: list[float], order: list[int]) -> torch.Tensor:
    """[1, V] logits whose softmax puts probs[j] on token order[j]."""
    logits = torch.full((1, len(probs)), 0.0)
    for p, token in zip(probs, order):
        logits[0, token] = math.log(p)
    return logits


# 0.5, 0.3, 0.15, 0.05, spread over shuffled token ids.
PROBS = [0.5, 0.3, 0.15, 0.05]
ORDER = [2, 0, 3, 1]


def sampled_ids(logits: torch.Tensor, n: int, **kw) -> Counter:
    """Samples the one-row logits n times, as one batch of n identical rows."""
    sampler = Sampler(seed=0)
    rows = [row(**kw) for _ in range(n)]
    return Counter(t.token_id for t in sampler(logits.expand(n, -1), rows))


# ---- greedy and fast path ---------------------------------------------------------


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 1000)
    out = Sampler(seed=0)(logits, [row(temperature=0) for _ in range(8)])
    assert [t.token_id for t in out] == logits.argmax(dim=-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_greedy_bf16_input() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    out = Sampler()(logits.bfloat16(), [row(temperature=0, logprobs=1) for _ in range(4)])
    assert [t.token_id for t in out] == logits.bfloat16().float().argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0])
def test_top_k_1_equals_greedy(temperature: float) -> None:
    torch.manual_seed(2)
    logits = torch.randn(16, 500)
    rows = [row(temperature=temperature, top_k=1) for _ in range(8)]
    rows += [row(temperature=temperature, top_k=1, seed=i) for i in range(8)]
    out = Sampler()(logits, rows)
    assert [t.token_id for t in out] == logits.argmax(dim=-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    torch.manual_seed(3)
    logits = torch.randn(6, 200)
    rows = [row(temperature=0), row(temperature=2.0), row(temperature=0, logprobs=2)] * 2
    out = Sampler(seed=1)(logits, rows)
    argmax = logits.argmax(dim=-1).tolist()
    assert [out[i].token_id for i in (0, 2, 3, 5)] == [argmax[i] for i in (0, 2, 3, 5)]


def test_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\[2, V\], got \(3, 10\)"):
        Sampler()(torch.zeros(3, 10), [row(), row()])


# ---- truncation on a hand-made distribution -------------------------------------


@pytest.mark.parametrize(
    ("kw", "allowed"),
    [
        ({}, {2, 0, 3, 1}),
        ({"top_k": 2}, {2, 0}),
        ({"top_k": 3}, {2, 0, 3}),
        ({"top_p": 0.7}, {2, 0}),  # mass before: 0, .5 | .8
        ({"top_p": 0.85}, {2, 0, 3}),  # 0, .5, .8 | .95
        ({"top_p": 0.4}, {2}),
        ({"min_p": 0.2}, {2, 0, 3}),  # threshold 0.1
        ({"min_p": 0.5}, {2, 0}),  # threshold 0.25
        ({"min_p": 0.61}, {2}),  # threshold 0.305
        # top-k renormalizes to .526, .316, .158 before top-p: mass before .526 < .6.
        ({"top_k": 3, "top_p": 0.6}, {2, 0}),
        ({"top_k": 3, "top_p": 0.5}, {2}),
        # top-p leaves .5/.8, .3/.8 = .625, .375; min_p .7 → threshold .4375.
        ({"top_p": 0.7, "min_p": 0.7}, {2}),
    ],
)
def test_truncation_only_yields_allowed_ids(kw: dict, allowed: set[int]) -> None:
    counts = sampled_ids(hand_logits(PROBS, ORDER), 2000, **kw)
    assert set(counts) == allowed


def test_temperature_applies_before_top_p() -> None:
    # Temperature comes before top-p: at temperature 0.1 the head holds ~all mass.
    counts = sampled_ids(hand_logits(PROBS, ORDER), 2000, temperature=0.1, top_p=0.9)
    assert set(counts) == {2}


def test_sampling_frequencies_follow_probabilities() -> None:
    counts = sampled_ids(hand_logits(PROBS, ORDER), 20000)
    for p, token in zip(PROBS, ORDER):
        assert abs(counts[token] / 20000 - p) < 0.015


def test_apply_top_k_top_p_masks_exactly() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.4, 0.1]]))
    out = apply_top_k_top_p(logits, [2, None], [1.0, 0.6])
    # Row 0: top-2 are ids 1 and 3. Row 1: sorted .4 (id 2), .25, .25: mass before
    # the second is .4 < .6 and before the third .65 → one of the tied ids stays.
    assert torch.isinf(out[0]).tolist() == [True, False, True, False]
    assert out[0, 1] == logits[0, 1] and out[0, 3] == logits[0, 3]
    kept = (~torch.isinf(out[1])).nonzero().flatten().tolist()
    assert 2 in kept and len(kept) == 2 and 3 not in kept


def test_apply_top_k_keeps_ties_with_kth() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    out = apply_top_k_top_p(logits, [2], [1.0])
    assert torch.isinf(out[0]).tolist() == [False, True, False, False, True]


def test_apply_min_p_exact() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_min_p(probs, torch.tensor([[0.2]]))
    assert out.tolist() == [[0.5, 0.30000001192092896, 0.15000000596046448, 0.0]]


# ---- penalties -------------------------------------------------------------------


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0]])
    r = row(
        prompt=[0],
        output=[1, 1, 2],
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    out = penalized_logits(logits, [r])
    expected = [
        2.0 / 2,  # prompt token, positive: divided; not in output
        -1.0 * 2 - 0.5 * 2 - 0.25,  # output twice, negative: multiplied
        0.5 / 2 - 0.5 * 1 - 0.25,  # output once
        -0.5,  # unseen
        3.0,  # unseen
    ]
    assert out[0].tolist() == expected
    assert logits[0].tolist() == [2.0, -1.0, 0.5, -0.5, 3.0]  # input untouched


def test_presence_frequency_ignore_prompt_tokens() -> None:
    logits = torch.zeros(1, 4)
    out = penalized_logits(logits, [row(prompt=[0, 0], output=[3], presence_penalty=1.0)])
    assert out[0].tolist() == [0.0, 0.0, 0.0, -1.0]


def test_penalties_only_touch_their_rows() -> None:
    logits = torch.ones(3, 4)
    rows = [row(output=[0]), row(output=[0], frequency_penalty=1.5), row(output=[1])]
    out = penalized_logits(logits, rows)
    assert out.tolist() == [[1.0] * 4, [-0.5, 1.0, 1.0, 1.0], [1.0] * 4]


def test_apply_penalties_batched_columns() -> None:
    logits = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    seen = torch.tensor([[True, True], [False, False]])
    counts = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    out = apply_penalties(
        logits,
        seen,
        counts,
        torch.tensor([[4.0], [1.0]]),
        torch.tensor([[0.1], [1.0]]),
        torch.tensor([[0.0], [-2.0]]),
    )
    assert out.tolist() == [[0.25, pytest.approx(-4.0 - 0.3)], [1.0 - 1.0 + 2.0, -1.0]]


def test_greedy_with_penalty_changes_choice() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    out = Sampler()(logits, [row(temperature=0, output=[0], frequency_penalty=2.0)])
    assert out[0].token_id == 1


# ---- seeds ---------------------------------------------------------------------


def seeded_run(sampler: Sampler, logits: torch.Tensor, position: int, others: int) -> list[int]:
    """Decodes 12 steps of a seeded request at `position` among `others` other rows."""
    out: list[int] = []
    other_rows = [
        row(temperature=0.8, top_p=0.9),
        row(temperature=0),
        row(seed=99, top_k=5),
        row(temperature=1.3, min_p=0.05, logprobs=3),
    ]
    for _ in range(12):
        rows = [other_rows[i % len(other_rows)] for i in range(others)]
        rows.insert(position, row(output=list(out), seed=1234, temperature=0.9, top_k=50))
        batch = logits.expand(len(rows), -1)
        out.append(sampler(batch, rows)[position].token_id)
    return out


def test_seeded_row_is_batch_and_instance_independent() -> None:
    torch.manual_seed(4)
    logits = torch.randn(1, 1000)
    alone = seeded_run(Sampler(seed=0), logits, position=0, others=0)
    assert seeded_run(Sampler(seed=0), logits, position=3, others=5) == alone
    assert seeded_run(Sampler(seed=7), logits, position=1, others=2) == alone
    assert seeded_run(Sampler(), logits, position=4, others=4) == alone
    assert len(set(alone)) > 3  # the draws really vary with the index


def test_seeded_row_recompute_after_preemption() -> None:
    torch.manual_seed(5)
    logits = torch.randn(1, 500)
    r = row(output=[1, 2, 3], prompt=[9], seed=42)
    first = Sampler()(logits, [r])[0].token_id
    # A fresh sampler, other rows in flight: same (seed, index) → same token.
    again = Sampler()(logits.expand(3, -1), [row(), r, row(seed=42)])
    assert again[1].token_id == first


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: the draw is all noise
    tokens = [Sampler()(logits, [row(seed=s)])[0].token_id for s in range(20)]
    assert len(set(tokens)) > 15


def test_seed_mix_separates_neighbours() -> None:
    assert seed_for_step(1, 1) != seed_for_step(2, 0)
    assert seed_for_step(-3, 0) != seed_for_step(3, 0)
    assert 0 <= seed_for_step(-(2**70), 5) < 2**64


def test_unseeded_rows_follow_sampler_seed() -> None:
    torch.manual_seed(6)
    logits = torch.randn(8, 400)
    rows = [row(temperature=1.0) for _ in range(8)]
    a = [t.token_id for t in Sampler(seed=3)(logits, rows)]
    b = [t.token_id for t in Sampler(seed=3)(logits, rows)]
    assert a == b


# ---- logprobs ------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, 100)
    rows = [
        row(logprobs=5, temperature=0.5, repetition_penalty=1.5, output=[1, 2]),
        row(logprobs=None),
        row(logprobs=2, temperature=0),
    ]
    out = Sampler(seed=0)(logits, rows)
    ref = torch.log_softmax(logits, dim=-1)
    for i, n in ((0, 5), (2, 2)):
        tok = out[i]
        assert type(tok.token_id) is int and all(type(t) is int for t, _ in tok.top_logprobs)
        assert tok.logprob == pytest.approx(ref[i, tok.token_id].item(), abs=1e-6)
        vals, ids = ref[i].topk(n)
        assert [t for t, _ in tok.top_logprobs] == ids.tolist()
        assert [v for _, v in tok.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-6)
        lps = [v for _, v in tok.top_logprobs]
        assert lps == sorted(lps, reverse=True)
    assert out[1].logprob is None and out[1].top_logprobs is None


def test_logprobs_zero_gives_only_chosen() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler()(logits, [row(temperature=0, logprobs=0)])
    assert out[0] == SampledToken(
        2, pytest.approx(torch.log_softmax(logits, -1)[0, 2].item()), ()
    )


def test_logprobs_more_than_vocab() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler()(logits, [row(temperature=0, logprobs=20)])
    assert [t for t, _ in out[0].top_logprobs] == [2, 1, 0]
