"""yard's types to vLLM's and back: sampling parameters in, a request's delta
output out (as a StepOutput with absolute token indexes)."""

from __future__ import annotations

from typing import Any, Optional

from vllm import SamplingParams as VLLMSamplingParams
from vllm.sampling_params import RequestOutputKind

from workers.engine.outputs import StepOutput
from workers.engine.sampler import SampledToken
from workers.sampling_params import SamplingParams


def vllm_params(params: SamplingParams, max_tokens: int) -> VLLMSamplingParams:
    """The same request for vLLM; `max_tokens` is what is left of params.max_tokens
    (a resumed request has already produced some). Each step returns only what is new,
    as token ids: yard's detokenizer makes the text and matches the stop strings."""
    return VLLMSamplingParams(
        n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0, min_p=params.min_p,
        seed=params.seed, presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, max_tokens=max_tokens,
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos, logprobs=params.logprobs,
        detokenize=False, output_kind=RequestOutputKind.DELTA)


def sampled_tokens(token_ids: tuple[int, ...], logprobs: Any, num_top: int) -> tuple[SampledToken, ...]:
    """vLLM's per-token {token id: Logprob} (the top num_top by rank, plus the sampled
    token wherever it ranks) as yard's SampledTokens: the sampled token's logprob and
    the top num_top, highest first."""
    out = []
    for token, ranked in zip(token_ids, logprobs):
        top = sorted(((tid, lp) for tid, lp in ranked.items() if lp.rank is not None and lp.rank <= num_top),
                     key=lambda item: item[1].rank)
        out.append(SampledToken(token, ranked[token].logprob, tuple((tid, lp.logprob) for tid, lp in top)))
    return tuple(out)


def step_output(output: Any, start_index: int, num_prompt_tokens: int,
                num_top_logprobs: Optional[int]) -> StepOutput:
    """One RequestOutput (delta kind) as a StepOutput whose tokens start at start_index,
    without text (vLLM does not detokenize: see vllm_params)."""
    completion = output.outputs[0]
    token_ids = tuple(completion.token_ids)
    logprobs = None
    if num_top_logprobs is not None and completion.logprobs is not None:
        logprobs = sampled_tokens(token_ids, completion.logprobs, num_top_logprobs)
    return StepOutput(output.request_id, start_index, token_ids, logprobs, "",
                      finish_reason=completion.finish_reason if output.finished else None,
                      stop_reason=completion.stop_reason, num_prompt_tokens=num_prompt_tokens,
                      # A request handed over with its KV (kv_handover.py) counts its
                      # output so far as cached too; usage reports the prompt's share.
                      num_cached_tokens=min(output.num_cached_tokens or 0, num_prompt_tokens))
