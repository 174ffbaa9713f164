"""Open-loop load for bench/serving.py: the workload, the arrival processes, two ways to
send a request (OpenAI HTTP streaming, or straight to a worker actor over Ray) and the
latency/throughput summary.

Workload. Prompt and output lengths are drawn from a real production trace
(`../shared/traces/azure2023_conv.csv` next to the repository; Azure LLM inference
trace 2023, conversation) and scaled down for a 2-core CPU: prompt tokens divided by 8
and output tokens by 2 by default (trace means 1,155 in / 211 out become about
144 in / 105 out: ShareGPT-like proportions, ShareGPT itself being about 220 in /
190 out). Without the trace, lengths come from a synthetic ShareGPT-like log-normal
(median 100 in / 90 out). Prompts are random token ids (seeded, special ids
avoided), so every system sees exactly the same prompt lengths; `ignore_eos` makes
the output lengths exact.

Arrivals. Poisson at `rate` (exponential gaps, CV 1), bursty Gamma gaps with the
same mean and a chosen coefficient of variation (shape 1/CV^2: CV 3 is shape 1/9,
vLLM's `--burstiness 0.111`), or everything at t=0 (`saturate`: the throughput
ceiling).

Metrics, per request: TTFT (send to the first streamed output text, the same on both
paths), TPOT ((end - first) / (output tokens - 1)), end-to-end latency; per run: output tokens per second over
the time from the first send to the last completion.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Sequence
from urllib.parse import urlparse

ARRIVALS = ("poisson", "bursty", "saturate")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


# ------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class LengthScaling:
    prompt_scale: float = 1 / 8
    output_scale: float = 1 / 2
    max_prompt_len: int = 512
    max_output_len: int = 256
    min_prompt_len: int = 4
    min_output_len: int = 2  # TPOT needs two output tokens

    def prompt(self, n: float) -> int:
        return int(min(self.max_prompt_len, max(self.min_prompt_len, round(n * self.prompt_scale))))

    def output(self, n: float) -> int:
        return int(min(self.max_output_len, max(self.min_output_len, round(n * self.output_scale))))


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_token_ids: tuple[int, ...]
    output_len: int
    at_s: float  # send time, seconds after the scenario starts


def trace_lengths(path: Path, n: int, seed: int, scaling: LengthScaling) -> list[tuple[int, int]]:
    """n (prompt, output) length pairs sampled (seeded, with replacement) from the trace
    and scaled."""
    with open(path, newline="") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path} holds no requests")
    rng = random.Random(seed)
    return [(scaling.prompt(p), scaling.output(o)) for p, o in (rng.choice(rows) for _ in range(n))]


def synthetic_lengths(n: int, seed: int, scaling: LengthScaling) -> list[tuple[int, int]]:
    """ShareGPT-like lengths without the trace: log-normal, median 100 in / 90 out,
    sigma 1.0 / 0.8 (heavy right tails), clipped to the scaling's bounds (not scaled)."""
    rng = random.Random(seed)
    flat = LengthScaling(1.0, 1.0, scaling.max_prompt_len, scaling.max_output_len,
                         scaling.min_prompt_len, scaling.min_output_len)
    return [(flat.prompt(rng.lognormvariate(math.log(100), 1.0)),
             flat.output(rng.lognormvariate(math.log(90), 0.8))) for _ in range(n)]


def random_token_prompt(rng: random.Random, length: int, vocab_size: int, avoid: set[int]) -> tuple[int, ...]:
    ids: list[int] = []
    while len(ids) < length:
        t = rng.randrange(vocab_size)
        if t not in avoid:
            ids.append(t)
    return tuple(ids)


def arrival_times(n: int, kind: str, rate: float, cv: float, seed: int) -> list[float]:
    """Send offsets (s) of n requests; the first goes at 0."""
    if kind == "saturate" or math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed)
    if kind == "poisson":
        gaps = [rng.expovariate(rate) for _ in range(n - 1)]
    elif kind == "bursty":
        shape = 1.0 / (cv * cv)  # Gamma CV = 1/sqrt(shape); mean shape*scale = 1/rate
        gaps = [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in range(n - 1)]
    else:
        raise ValueError(f"arrival kind must be one of {ARRIVALS}, got {kind!r}")
    out, t = [0.0], 0.0
    for g in gaps:
        t += g
        out.append(t)
    return out


def build_specs(lengths: Sequence[tuple[int, int]], times: Sequence[float], vocab_size: int,
                avoid: Sequence[int], seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)
    skip = set(avoid)
    return [RequestSpec(i, random_token_prompt(rng, p, vocab_size, skip), o, t)
            for i, ((p, o), t) in enumerate(zip(lengths, times))]


# ------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    index: int
    prompt_len: int
    output_len: int  # asked for (ignore_eos: exactly what should come back)
    sent_s: float = 0.0  # relative to the scenario's start
    ok: bool = False
    error: Optional[str] = None
    output_tokens: int = 0
    chunks: int = 0  # streamed pieces that carried output (HTTP chunks / Tokens events)
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None

    @property
    def tpot_s(self) -> Optional[float]:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default, vLLM's too)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(outcomes: Sequence[Outcome], wall_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    out_tokens = sum(o.output_tokens for o in ok)
    summary: dict[str, Any] = {
        "requests": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
        "short_outputs": sum(o.output_tokens != o.output_len for o in ok),
        "wall_s": wall_s, "output_tokens": out_tokens,
        "prompt_tokens": sum(o.prompt_len for o in ok),
        "request_throughput": len(ok) / wall_s if wall_s > 0 else None,
        "output_throughput": out_tokens / wall_s if wall_s > 0 else None,
    }
    errors = sorted({o.error for o in outcomes if o.error})
    if errors:
        summary["errors"] = errors[:5]
    for name, values in (("ttft", [o.ttft_s for o in ok]), ("tpot", [o.tpot_s for o in ok]),
                         ("e2e", [o.e2e_s for o in ok])):
        xs = [v * 1000 for v in values if v is not None]
        summary[f"mean_{name}_ms"] = sum(xs) / len(xs) if xs else None
        summary[f"p50_{name}_ms"] = percentile(xs, 50)
        summary[f"p99_{name}_ms"] = percentile(xs, 99)
    return summary


def compact(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Per-request records for the JSON (no token ids)."""
    rows = []
    for o in outcomes:
        d = asdict(o)
        d["tpot_s"] = o.tpot_s
        rows.append(d)
    return rows


# ------------------------------------------------------------------------- the driver


Send = Callable[[RequestSpec, Outcome], Awaitable[None]]


async def run_load(specs: Sequence[RequestSpec], send: Send, max_duration_s: float,
                   request_timeout_s: float) -> tuple[list[Outcome], float]:
    """Send each spec at its time (open loop: no waiting for earlier ones), bounded by
    `max_duration_s` for sending and `request_timeout_s` per request. Returns the
    outcomes (in spec order; requests not sent within the duration are left out) and
    the wall time from the start to the last completion."""
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task] = []
    last_end = [start]

    async def one(spec: RequestSpec, outcome: Outcome) -> None:
        try:
            await asyncio.wait_for(send(spec, outcome), request_timeout_s)
        except asyncio.TimeoutError:
            outcome.ok, outcome.error = False, f"no completion within {request_timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - one failed request must not end the run
            outcome.ok, outcome.error = False, f"{type(e).__name__}: {e}"[:300]
        last_end[0] = max(last_end[0], time.perf_counter())

    for spec in specs:
        if spec.at_s > max_duration_s:
            break
        delay = start + spec.at_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        outcome = Outcome(spec.index, len(spec.prompt_token_ids), spec.output_len,
                          sent_s=time.perf_counter() - start)
        outcomes.append(outcome)
        tasks.append(asyncio.create_task(one(spec, outcome)))
    if tasks:
        await asyncio.gather(*tasks)
    return outcomes, last_end[0] - start


# ------------------------------------------------------------------------- clients


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname or ""
    if host not in LOOPBACK_HOSTS and not host.startswith("127."):
        raise ValueError(f"the load generator only targets loopback addresses; got {base_url!r}")


@dataclass
class HttpClient:
    """Streaming `/v1/completions` with token-id prompts, one connection per request
    through the lean client of bench/sse_client.py.

    TTFT ends at the first SSE chunk that carries a choice (vLLM's benchmark client
    counts the same way); the output token count comes from the usage chunk
    (`stream_options.include_usage`)."""

    base_url: str  # ending in /v1
    model: str
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_loopback(self.base_url)

    async def __aenter__(self) -> "HttpClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        pass

    async def send(self, spec: RequestSpec, outcome: Outcome) -> None:
        from sse_client import HttpError, post_lines

        payload = {"model": self.model, "prompt": list(spec.prompt_token_ids),
                   "max_tokens": spec.output_len, "temperature": 0.0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}, **self.extra_body}
        t0 = time.perf_counter()
        usage_tokens: Optional[int] = None
        try:
            async for line in post_lines(self.base_url.rstrip("/") + "/completions", payload):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj and not obj.get("choices"):
                    outcome.error = f"stream error: {json.dumps(obj['error'])[:200]}"
                    return
                if obj.get("choices"):
                    if outcome.ttft_s is None:
                        outcome.ttft_s = time.perf_counter() - t0
                    outcome.chunks += 1
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
        except HttpError as e:
            outcome.error = str(e)
            return
        outcome.e2e_s = time.perf_counter() - t0
        if usage_tokens is None:
            outcome.error = "the stream ended without a usage chunk"
            return
        outcome.output_tokens = usage_tokens
        outcome.ok = outcome.ttft_s is not None


@dataclass
class WorkerClient:
    """Straight to one `Worker` actor over Ray from this process, through the same
    `WorkerLink` a router replica uses, with no HTTP, proxy or router in between."""

    handle: Any
    tag: str = "direct"
    link: Any = None

    async def send(self, spec: RequestSpec, outcome: Outcome) -> None:
        from router.worker_link import WorkerLink
        from workers.events import Failed, Finished, Tokens, WorkerRequest
        from workers.sampling_params import SamplingParams

        if self.link is None:
            self.link = WorkerLink(self.tag, self.handle)
        request = WorkerRequest(f"bench-{self.tag}-{spec.index}-{time.monotonic_ns()}",
                                spec.prompt_token_ids,
                                SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True))
        t0 = time.perf_counter()
        finished = False
        async for batch in self.link.stream(request):
            for event in batch:
                if isinstance(event, Tokens):
                    # As an HTTP client sees it: the first token that shows text (one
                    # that ends inside a UTF-8 character shows none, and sends no chunk).
                    if outcome.ttft_s is None and event.text:
                        outcome.ttft_s = time.perf_counter() - t0
                    outcome.chunks += 1
                    outcome.output_tokens += len(event.token_ids)
                elif isinstance(event, Finished):
                    finished = True
                elif isinstance(event, Failed):
                    outcome.error = f"{event.code}: {event.message}"[:300]
        outcome.e2e_s = time.perf_counter() - t0
        outcome.ok = finished and outcome.ttft_s is not None and outcome.error is None


async def warm_up(send: Send, specs: Sequence[RequestSpec], timeout_s: float) -> list[Outcome]:
    """Untimed requests, all at once: first calls, connections, kernels."""
    warm = [RequestSpec(s.index, s.prompt_token_ids, s.output_len, 0.0) for s in specs]
    outcomes, _ = await run_load(warm, send, max_duration_s=math.inf, request_timeout_s=timeout_s)
    return outcomes
