"""Per-request sampling parameters, with vLLM's names and defaults.

A `SamplingParams` crosses the router → worker boundary with every request, so it
is frozen and validated once, here: a bad value fails that request with a message
that names the field and the value, and the sampler never has to re-check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The OpenAI API caps top logprobs at 20; vLLM's default max_logprobs is 20 too.
MAX_LOGPROBS = 20


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but True as max_tokens is a caller bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _require_number(name: str, value: Any) -> None:
    if not _is_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _require_int(name: str, value: Any) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k None (or 0 / -1 on input, as vLLM accepts)
    means off. logprobs n returns the sampled token's logprob plus the top n;
    0 returns only the sampled token's. `stop` accepts a str or a list and is kept
    as a tuple so the value stays hashable and immutable.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._check_floats()
        self._check_ints()
        self._normalize_stops()
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _require_bool(name, getattr(self, name))

    def _check_floats(self) -> None:
        _require_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        _require_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _require_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        _require_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    def _check_ints(self) -> None:
        if self.top_k is not None:
            _require_int("top_k", self.top_k)
            if self.top_k in (0, -1):
                # vLLM and HF spell "off" as 0 or -1; one spelling downstream.
                object.__setattr__(self, "top_k", None)
            elif self.top_k < 1:
                raise ValueError(f"top_k must be >= 1 (or 0, -1, None for off), got {self.top_k!r}")
        if self.seed is not None:
            _require_int("seed", self.seed)
        _require_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    def _normalize_stops(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str or a list of str, got {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold ints >= 0, got {t!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )
