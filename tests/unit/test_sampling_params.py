import dataclasses
import re

import pytest

from workers.sampling_params import SamplingParams


def test_defaults_mirror_vllm() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, None, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.stop, p.stop_token_ids, p.logprobs) == (16, (), (), None)
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (
        False,
        False,
        True,
    )
    assert not p.is_greedy
    assert not p.needs_penalties


def test_frozen_and_hashable() -> None:
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.0  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4)))


def test_stop_normalized_to_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[7, 9]).stop_token_ids == (7, 9)


@pytest.mark.parametrize("off", [None, 0, -1])
def test_top_k_off_spellings_normalize_to_none(off: int | None) -> None:
    assert SamplingParams(top_k=off).top_k is None


def test_top_k_kept_when_set() -> None:
    assert SamplingParams(top_k=40).top_k == 40


def test_is_greedy_and_needs_penalties() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy
    assert SamplingParams(presence_penalty=0.1).needs_penalties
    assert SamplingParams(frequency_penalty=-0.1).needs_penalties
    assert SamplingParams(repetition_penalty=1.1).needs_penalties


def test_boundary_values_accepted() -> None:
    SamplingParams(
        temperature=0,
        top_p=1,
        top_k=1,
        min_p=1.0,
        presence_penalty=-2,
        frequency_penalty=2,
        repetition_penalty=1e-3,
        max_tokens=1,
        logprobs=20,
        seed=-5,
    )
    SamplingParams(min_p=0, logprobs=0, top_p=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
        ({"temperature": "1"}, "temperature must be a finite number, got '1'"),
        ({"temperature": True}, "temperature must be a finite number, got True"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": None}, "top_p must be a finite number, got None"),
        ({"top_k": -2}, "top_k must be >= 1 (or 0, -1, None for off), got -2"),
        ({"top_k": 2.0}, "top_k must be an int, got 2.0"),
        ({"top_k": True}, "top_k must be an int, got True"),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        ({"min_p": 1.01}, "min_p must be in [0, 1], got 1.01"),
        ({"seed": 1.0}, "seed must be an int, got 1.0"),
        ({"seed": "7"}, "seed must be an int, got '7'"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"presence_penalty": -3}, "presence_penalty must be in [-2, 2], got -3"),
        ({"frequency_penalty": -2.01}, "frequency_penalty must be in [-2, 2], got -2.01"),
        ({"frequency_penalty": "0"}, "frequency_penalty must be a finite number, got '0'"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0, got -1.0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": 1.5}, "max_tokens must be an int, got 1.5"),
        ({"max_tokens": "3"}, "max_tokens must be an int, got '3'"),
        ({"max_tokens": True}, "max_tokens must be an int, got True"),
        ({"max_tokens": None}, "max_tokens must be an int, got None"),
        ({"logprobs": -1}, "logprobs must be in [0, 20], got -1"),
        ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ({"logprobs": 1.0}, "logprobs must be an int, got 1.0"),
        ({"logprobs": False}, "logprobs must be an int, got False"),
        ({"stop": ""}, "stop must hold non-empty strings, got ''"),
        ({"stop": ["a", ""]}, "stop must hold non-empty strings, got ''"),
        ({"stop": ["a", 3]}, "stop must hold non-empty strings, got 3"),
        ({"stop": 5}, "stop must be a str or a list of str, got 5"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids must hold ints >= 0, got -1"),
        ({"stop_token_ids": [1, 2.0]}, "stop_token_ids must hold ints >= 0, got 2.0"),
        ({"stop_token_ids": 3}, "stop_token_ids must be a list of int, got 3"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
        (
            {"include_stop_str_in_output": "yes"},
            "include_stop_str_in_output must be a bool, got 'yes'",
        ),
        ({"skip_special_tokens": None}, "skip_special_tokens must be a bool, got None"),
    ],
)
def test_invalid_values_name_field_and_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SamplingParams(**kwargs)
