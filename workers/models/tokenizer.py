"""The model's tokenizer and chat template, read from its Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.models.fast_tokenizer import plain_fast_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(model_dir: Path) -> Any:
    """The fast tokenizer where it is exactly what transformers would load (see
    fast_tokenizer.py); else transformers' own."""
    fast = plain_fast_tokenizer(Path(model_dir))
    return fast if fast is not None else load_hf_tokenizer(model_dir)


def load_hf_tokenizer(model_dir: Path) -> "PreTrainedTokenizerBase":
    """transformers' AutoTokenizer for the directory: where the fast tokenizer would
    differ from it, and what the offline LLM hands its users."""
    from transformers import AutoTokenizer  # imports torch: not at import time (router replicas)

    if not (Path(model_dir) / "tokenizer.json").exists() and not (Path(model_dir) / "tokenizer.model").exists():
        raise FileNotFoundError(f"no tokenizer.json in model directory {model_dir}")
    return AutoTokenizer.from_pretrained(str(model_dir))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt text to token ids, with the special tokens (BOS) the model expects."""
    return tokenizer.encode(prompt, add_special_tokens=True)


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Apply the chat template, then encode. The template writes its own special tokens
    (BOS included), so none are added again."""
    if not messages:
        raise ValueError("messages must not be empty")
    if tokenizer.chat_template is None:
        raise ValueError("the model's tokenizer_config.json has no chat_template")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
