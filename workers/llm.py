"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence as Seq, Union

from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampler import SampledToken
from workers.models.tokenizer import encode_chat, encode_prompt, load_hf_tokenizer
from workers.sampling_params import SamplingParams

Prompt = Union[str, Seq[int]]
Messages = list[dict[str, Any]]


@dataclass(slots=True)
class CompletionOutput:
    prompt: Optional[str]
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = None  # type: ignore[assignment]
    logprobs: Optional[list[SampledToken]] = None
    finish_reason: Optional[str] = None  # "stop", "length", or "error"
    stop_reason: Union[int, str, None] = None
    error: Optional[str] = None  # why the request failed (finish_reason "error")

    def __post_init__(self) -> None:
        if self.token_ids is None:
            self.token_ids = []


class LLM:
    """Runs one engine in this process. Keyword arguments are EngineConfig fields."""

    def __init__(self, model: str = "tiny-llama", dtype: Optional[str] = None, **engine_args: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise TypeError(f"unknown engine arguments {unknown}; known: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_args))
        # Users get transformers' tokenizer, as from vLLM's LLM; the engine's may be the
        # fast one, which gives the same ids and text (workers/models/fast_tokenizer.py).
        self.tokenizer = load_hf_tokenizer(self.engine.model_dir)
        self._ids = itertools.count()
        # An instance dropped without close() still releases its ranks (and their
        # CPUs, which the next tensor-parallel instance needs) when it is collected.
        self._release = weakref.finalize(self, self.engine.shutdown)

    def close(self) -> None:
        """Release the tensor-parallel ranks and their placement group, if any; once."""
        self._release()

    shutdown = close

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                 priority: Optional[Seq[int]] = None) -> list[CompletionOutput]:
        """Text prompts or token-id lists; one output per prompt, in order. A prompt
        that cannot run (too long, bad token ids) fails alone with finish_reason "error"."""
        batch = _as_prompt_list(prompts)
        encoded = [(p, None) if isinstance(p, str) else (None, list(p)) for p in batch]
        outputs = [CompletionOutput(prompt=text, prompt_token_ids=ids if ids is not None
                                    else encode_prompt(self.tokenizer, text)) for text, ids in encoded]
        return self._run(outputs, sampling_params, priority)

    def chat(self, messages: Union[Messages, Seq[Messages]],
             sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None) -> list[CompletionOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        outputs = [CompletionOutput(prompt=None, prompt_token_ids=encode_chat(self.tokenizer, list(c)))
                   for c in conversations]
        return self._run(outputs, sampling_params, None)

    def _run(self, outputs: list[CompletionOutput], sampling_params: Any,
             priority: Optional[Seq[int]]) -> list[CompletionOutput]:
        params = _per_prompt(sampling_params or SamplingParams(), len(outputs), "sampling_params")
        priorities = _per_prompt(priority if priority is not None else 0, len(outputs), "priority")
        by_id: dict[str, CompletionOutput] = {}
        for out, p, prio in zip(outputs, params, priorities):
            rid = f"offline-{next(self._ids)}"
            try:
                self.engine.add_request(rid, out.prompt_token_ids, p, priority=prio)
            except ValueError as e:
                out.finish_reason, out.error = "error", str(e)
                continue
            out.logprobs = [] if p.logprobs is not None else None
            by_id[rid] = out
        while self.engine.has_unfinished_requests():
            for step in self.engine.step():
                out = by_id.get(step.request_id)
                if out is None:
                    continue
                out.token_ids.extend(step.new_token_ids)
                out.text += step.new_text
                if step.new_logprobs is not None:
                    out.logprobs.extend(step.new_logprobs)
                if step.finished:
                    out.finish_reason, out.stop_reason, out.error = step.finish_reason, step.stop_reason, step.error
        return outputs


def _as_prompt_list(prompts: Union[Prompt, Seq[Prompt]]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
