"""Request traces for the simulator: when each request arrives, how long its prompt
and its output are, and (Mooncake's) which prompt blocks it shares with others.

Two formats:
  * CSV with the columns arrived_at (seconds), num_prefill_tokens, num_decode_tokens:
    the Azure LLM inference trace as Splitwise and Vidur publish it
    (../shared/traces/azure2023_conv.csv). Prompts share nothing.
  * JSON lines as Mooncake publishes them: timestamp (milliseconds), input_length,
    output_length, hash_ids (one id per 512-token block of the prompt; equal ids are
    equal blocks, so prefixes are shared and the prefix cache hits).

Prompt tokens are made from that: a request's own tokens where it shares nothing,
the same tokens for the same hash id. A bad line is refused with its number and field.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

CSV_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
MOONCAKE_BLOCK_TOKENS = 512
# Token ids are plain ints to the block manager: a request's own tokens start at
# its index times this (no two requests collide), shared blocks' below zero.
_OWN_TOKEN_SPAN = 1 << 24


@dataclass(frozen=True, slots=True)
class TraceRequest:
    index: int  # position in the trace: names the request
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()  # Mooncake's prompt blocks, each hash_block_tokens long
    hash_block_tokens: int = MOONCAKE_BLOCK_TOKENS

    @property
    def request_id(self) -> str:
        return f"r{self.index}"

    def prompt_token_ids(self) -> list[int]:
        """The prompt: for each hash id, its block's tokens (the last block cut to the
        prompt's length), then the request's own tokens for what the ids do not cover."""
        tokens: list[int] = []
        b = self.hash_block_tokens
        for h in self.hash_ids:
            start = -(h + 1) * b
            tokens.extend(range(start, start + b))
        del tokens[self.prompt_tokens:]
        own = self.index * _OWN_TOKEN_SPAN
        tokens.extend(range(own, own + self.prompt_tokens - len(tokens)))
        return tokens


@dataclass(frozen=True)
class TraceScale:
    """How a trace is fitted to the cluster simulated (and reported with the results):
    arrivals are compressed by time_scale (2: twice the rate), lengths divided by
    length_divisor then capped, and only the first `limit` requests kept."""

    time_scale: float = 1.0
    length_divisor: int = 1
    max_prompt_tokens: Optional[int] = None
    max_output_tokens: Optional[int] = None
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale must be a finite number > 0, got {self.time_scale!r}")
        for name in ("length_divisor", "max_prompt_tokens", "max_output_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def apply(self, r: TraceRequest) -> TraceRequest:
        d = self.length_divisor
        prompt = max(1, r.prompt_tokens // d)
        output = max(1, r.output_tokens // d)
        if self.max_prompt_tokens is not None:
            prompt = min(prompt, self.max_prompt_tokens)
        if self.max_output_tokens is not None:
            output = min(output, self.max_output_tokens)
        return TraceRequest(r.index, r.arrival_s / self.time_scale, prompt, output, r.hash_ids,
                            max(1, r.hash_block_tokens // d))


def read_trace(path: Path, scale: TraceScale = TraceScale()) -> list[TraceRequest]:
    """The trace's requests in arrival order, scaled. The format follows the suffix:
    .csv, or .jsonl (Mooncake)."""
    path = Path(path)
    if path.suffix == ".csv":
        rows = _read_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_mooncake(path)
    else:
        raise ValueError(f"{path}: a trace is .csv (arrived_at, num_prefill_tokens, num_decode_tokens) "
                         f"or .jsonl (Mooncake), got {path.suffix or 'no suffix'!r}")
    requests: list[TraceRequest] = []
    for r in rows:
        if scale.limit is not None and len(requests) >= scale.limit:
            break
        requests.append(scale.apply(r))
    if not requests:
        raise ValueError(f"{path}: the trace holds no request")
    return sorted(requests, key=lambda r: (r.arrival_s, r.index))


def _read_csv(path: Path) -> Iterator[TraceRequest]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CSV_COLUMNS:
            raise ValueError(f"{path} line 1: the header must be {','.join(CSV_COLUMNS)}, got {header!r}")
        index = 0
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(CSV_COLUMNS):
                raise ValueError(f"{path} line {line}: {len(CSV_COLUMNS)} fields expected, got {len(row)}: {row!r}")
            where = f"{path} line {line}"
            yield TraceRequest(index, _seconds(where, "arrived_at", row[0]),
                               _count(where, "num_prefill_tokens", row[1]), _count(where, "num_decode_tokens", row[2]))
            index += 1


def _read_mooncake(path: Path) -> Iterator[TraceRequest]:
    with path.open() as f:
        index = 0
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path} line {line}"
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: a JSON object expected, got {type(raw).__name__}")
            for name in ("timestamp", "input_length", "output_length"):
                if name not in raw:
                    raise ValueError(f"{where}: field {name!r} is missing")
            prompt = _count(where, "input_length", raw["input_length"])
            hash_ids = _hash_ids(where, raw.get("hash_ids", []), prompt)
            yield TraceRequest(index, _seconds(where, "timestamp", raw["timestamp"]) / 1000.0, prompt,
                               _count(where, "output_length", raw["output_length"]), hash_ids)
            index += 1


def _seconds(where: str, name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return number


def _count(where: str, name: str, value: Any) -> int:
    if isinstance(value, str):
        value = value.strip()
        if value.isdigit():
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    return value


def _hash_ids(where: str, value: Any, prompt: int) -> tuple[int, ...]:
    if not isinstance(value, list) or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in value):
        raise ValueError(f"{where}: hash_ids must be a list of integers >= 0, got {value!r}")
    blocks = -(-prompt // MOONCAKE_BLOCK_TOKENS)
    if len(value) > blocks:
        raise ValueError(f"{where}: hash_ids has {len(value)} ids, but input_length {prompt} fills only "
                         f"{blocks} blocks of {MOONCAKE_BLOCK_TOKENS} tokens")
    return tuple(value)
