"""The checks a request's tokens pass before any engine takes it, with the messages
that name the field and the value: the same whichever engine runs it."""

from __future__ import annotations

from typing import Sequence as Seq


def check_prompt(prompt: Seq[int], vocab_size: int) -> None:
    if not prompt:
        raise ValueError("prompt_token_ids must not be empty")
    check_token_ids("prompt_token_ids", prompt, vocab_size)


def check_token_ids(field: str, tokens: Seq[int], vocab_size: int) -> None:
    bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{field} holds {bad!r}, not a token id in [0, {vocab_size})")


def output_room(num_prompt_tokens: int, max_model_len: int, bound: str) -> int:
    """How many tokens a prompt of this length leaves for output; raises if none."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise ValueError(f"prompt has {num_prompt_tokens} tokens; it must be shorter than max_model_len "
                         f"({max_model_len}), set by {bound}")
    return room
