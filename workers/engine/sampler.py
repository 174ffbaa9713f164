"""The batched sampler: logits for a batch of rows in, one token per row out.

Order, as HF's processors and warpers: penalties → temperature → top-k → top-p →
min-p → draw (vLLM v1 applies min-p before top-k/top-p; the difference only shows
when both are set).
Greedy rows take the argmax of the penalized logits. Every stage runs on the whole
batch with per-row parameter tensors; a stage no row needs is skipped. Only the
seeded draws loop in Python, and results leave the device in one `.tolist()` at
the end, never a per-row `.item()`.

Logprobs are vLLM's default "raw_logprobs": log_softmax of the logits as the model
produced them, before penalties, temperature and truncation.

Seeded rows are reproducible: the noise for a row depends only on (seed, index of
the token being sampled), so the same request yields the same tokens alone or in
any batch, at any position, and after preemption and recompute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """One row of a batch: its parameters and the tokens the penalties look at. The
    token lists may be empty where the parameters use neither (`uses_token_history`)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    # Generated so far; len(...) is the output index of the token sampled now.
    output_token_ids: Sequence[int]


def uses_token_history(params: SamplingParams) -> bool:
    """Whether sampling looks at the request's tokens: penalties count them, a seed
    takes the output index from them."""
    return params.needs_penalties or params.seed is not None


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    # Raw logprob of token_id; None unless params.logprobs is set.
    logprob: float | None
    # Top-n (token, raw logprob), highest first; () for logprobs=0, None when unset.
    top_logprobs: tuple[tuple[int, float], ...] | None


def seed_for_step(seed: int, index: int) -> int:
    """A 64-bit seed from (request seed, output index), well mixed (splitmix64).

    Mixing matters: seeding with seed + index would make request (s, i+1) replay
    request (s+1, i).
    """
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Sampler:
    """Samples one token per row. Holds only generators, so it is cheap to keep."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        # One generator per device for unseeded rows, and one re-seeded per seeded row.
        self._generators: dict[torch.device, torch.Generator] = {}
        self._row_generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [len(rows), vocab] = [{len(rows)}, V], got {tuple(logits.shape)}"
            )
        params = [row.params for row in rows]
        if all(p.is_greedy and not p.needs_penalties and p.logprobs is None for p in params):
            # The common serving case: one argmax, one transfer.
            return [SampledToken(t, None, None) for t in logits.argmax(dim=-1).tolist()]

        logits = logits.float()
        want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = (
            torch.log_softmax(_rows(logits, want_logprobs), dim=-1) if want_logprobs else None
        )
        logits = penalized_logits(logits, rows)
        tokens = self._choose(logits, rows)
        return self._results(tokens, raw_logprobs, want_logprobs, params)

    # ---- choosing ----------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        random_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if not random_rows:
            return greedy_tokens
        sub_rows = [rows[i] for i in random_rows]
        probs = self._truncated_probs(_rows(logits, random_rows), [r.params for r in sub_rows])
        noise = self._exponential_noise(probs, sub_rows)
        # Exponential race: argmax(p / E), E ~ Exp(1) i.i.d., picks token i with
        # probability p_i, and needs no cumsum or CPU sync.
        tokens = greedy_tokens.clone()
        tokens[random_rows] = (probs / noise).argmax(dim=-1)
        return tokens

    def _truncated_probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        device = logits.device
        logits = logits / _column([p.temperature for p in params], device)
        if any(p.top_k is not None or p.top_p < 1 for p in params):
            top_k = [p.top_k for p in params]
            top_p = [p.top_p for p in params]
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if any(p.min_p > 0 for p in params):
            probs = apply_min_p(probs, _column([p.min_p for p in params], device))
        return probs

    def _exponential_noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        unseeded = [i for i, row in enumerate(rows) if row.params.seed is None]
        if len(unseeded) == len(rows):
            noise.exponential_(generator=self._generator(probs.device))
        elif unseeded:
            block = torch.empty_like(probs[unseeded])
            noise[unseeded] = block.exponential_(generator=self._generator(probs.device))
        row_gen = self._row_generator(probs.device)
        for i, row in enumerate(rows):
            seed = row.params.seed
            if seed is not None:
                # Re-seeded from (seed, output index) alone: batch-independent.
                row_gen.manual_seed(seed_for_step(seed, len(row.output_token_ids)))
                noise[i].exponential_(generator=row_gen)
        # Exp(1) can draw exactly 0; p/0 would be inf or nan and win the argmax.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()  # nondeterministic, from the OS
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    def _row_generator(self, device: torch.device) -> torch.Generator:
        gen = self._row_generators.get(device)
        if gen is None:
            gen = self._row_generators[device] = torch.Generator(device=device)
        return gen

    # ---- results -----------------------------------------------------------------

    def _results(
        self,
        tokens: torch.Tensor,
        raw_logprobs: torch.Tensor | None,
        want: list[int],
        params: list[SamplingParams],
    ) -> list[SampledToken]:
        if raw_logprobs is None:
            return [SampledToken(t, None, None) for t in tokens.tolist()]
        picked = raw_logprobs.gather(1, tokens[want].unsqueeze(1)).squeeze(1)
        # One topk for the largest n asked; each row keeps its own first n.
        n_max = min(max(params[i].logprobs or 0 for i in want), raw_logprobs.shape[1])
        top_vals, top_ids = raw_logprobs.topk(n_max, dim=-1)
        # Everything leaves the device in one transfer: float64 holds token ids and
        # float32 logprobs exactly.
        packed = torch.cat(
            [t.double().flatten() for t in (tokens, picked, top_ids, top_vals)]
        ).tolist()
        b, w = len(tokens), len(want)
        token_list = [int(t) for t in packed[:b]]
        chosen = dict(zip(want, packed[b : b + w]))
        ids_flat = packed[b + w : b + w + w * n_max]
        vals_flat = packed[b + w + w * n_max :]
        tops: dict[int, tuple[tuple[int, float], ...]] = {}
        for j, i in enumerate(want):
            n = params[i].logprobs or 0
            row_ids = ids_flat[j * n_max : j * n_max + n]
            row_vals = vals_flat[j * n_max : j * n_max + n]
            tops[i] = tuple((int(t), v) for t, v in zip(row_ids, row_vals))
        return [
            SampledToken(t, chosen.get(i), tops.get(i)) for i, t in enumerate(token_list)
        ]


# ---- batched transforms (pure functions, tested directly) -------------------------


def penalized_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logits [B, V] float with each row's penalties applied; the input is not modified."""
    idx = [i for i, row in enumerate(rows) if row.params.needs_penalties]
    if not idx:
        return logits
    sub = [rows[i] for i in idx]
    vocab, device = logits.shape[1], logits.device
    out_counts = _token_counts([r.output_token_ids for r in sub], vocab, device)
    in_prompt = _token_counts([r.prompt_token_ids for r in sub], vocab, device) > 0
    rep = _column([r.params.repetition_penalty for r in sub], device)
    freq = _column([r.params.frequency_penalty for r in sub], device)
    pres = _column([r.params.presence_penalty for r in sub], device)
    block = apply_penalties(_rows(logits, idx), in_prompt, out_counts, rep, freq, pres)
    if len(idx) == len(rows):
        return block
    logits = logits.clone()  # never write into the caller's tensor
    logits[idx] = block
    return logits


def apply_penalties(
    logits: torch.Tensor,
    in_prompt: torch.Tensor,
    out_counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """Penalized copy of logits [B, V]; penalties are [B, 1] columns.

    Repetition (HF/vLLM) covers prompt and output tokens: positive logits are
    divided by the penalty, negative ones multiplied, so a penalty > 1 always makes
    a seen token less likely. Frequency and presence (OpenAI) cover output tokens
    only: logit -= frequency * count + presence * (count > 0).
    """
    seen = in_prompt | (out_counts > 0)
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, scaled, logits)
    return logits - frequency * out_counts - presence * (out_counts > 0).to(logits.dtype)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int | None], top_p: Sequence[float]
) -> torch.Tensor:
    """Copy of logits [B, V] with tokens outside each row's top-k / top-p set to -inf.

    top-k keeps every token tied with the k-th largest (as vLLM). top-p keeps the
    smallest head of the sorted distribution whose mass reaches p: a token stays if
    the mass strictly before it is < p, so the top token always stays.
    """
    device, vocab = logits.device, logits.shape[1]
    has_k = [k is not None for k in top_k]
    if all(p >= 1 for p in top_p):
        # top-k alone: topk over the largest k asked for beats a full sort.
        k_max = min(max(k for k in top_k if k is not None), vocab)
        kth = _kth_largest(logits.topk(k_max, dim=-1).values, top_k, k_max, has_k)
        return logits.masked_fill(logits < kth, float("-inf"))

    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if any(has_k):
        kth = _kth_largest(sorted_logits, top_k, vocab, has_k)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # p >= 1 means off: compare with inf so rounding in cumsum masks nothing.
    p_col = _column([p if p < 1 else float("inf") for p in top_p], device)
    sorted_logits = sorted_logits.masked_fill(mass_before >= p_col, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens whose probability is below min_p × the row's top probability.

    Returns unnormalized probabilities: the exponential race does not need a sum of 1.
    """
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def _kth_largest(
    desc_values: torch.Tensor, top_k: Sequence[int | None], width: int, has_k: list[bool]
) -> torch.Tensor:
    """Column [B, 1] of each row's k-th largest value; -inf for rows without top-k."""
    device = desc_values.device
    k_idx = torch.tensor(
        [min(k, width) - 1 if k is not None else 0 for k in top_k], device=device
    ).unsqueeze(1)
    kth = desc_values.gather(1, k_idx)
    off = torch.tensor([not h for h in has_k], device=device).unsqueeze(1)
    return kth.masked_fill(off, float("-inf"))


def _token_counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """counts[i, t] = occurrences of token t in seqs[i], as float32 [len(seqs), vocab]."""
    width = max((len(s) for s in seqs), default=0)
    # Pad with an extra column `vocab` that is dropped after the scatter.
    ids = torch.full((len(seqs), width), vocab, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    ids = ids.to(device)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """t[idx], without the copy when idx is every row (the usual case)."""
    return t if len(idx) == t.shape[0] else t[idx]


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
