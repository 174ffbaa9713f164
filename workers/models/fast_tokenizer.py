"""A model's tokenizer without transformers, where it is exactly transformers' own.

transformers' import costs a process seconds (4.5 s after torch on these machines:
every worker start) and, in a router replica that runs no model, torch's 300 MiB.
For a model whose tokenizer is a plain PreTrainedTokenizerFast, transformers itself
runs tokenizer.json through the `tokenizers` library and renders the chat template
with jinja2; this does the same directly. Any other tokenizer class (one transformers
may rebuild in its own code), a tokenizer_config.json whose BOS/EOS settings disagree
with tokenizer.json, or clean_up_tokenization_spaces: plain_fast_tokenizer answers
None, and load_tokenizer (workers/models/tokenizer.py) loads transformers' own.
tests/unit/test_fast_tokenizer.py checks both give the same ids and text.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class FastTokenizer:
    """What the router and the detokenizer ask of a tokenizer (encode, decode, the
    chat template), as transformers' PreTrainedTokenizerFast answers it."""

    def __init__(self, backend: Any, config: dict[str, Any]) -> None:
        self.backend = backend
        self.chat_template: Optional[str] = config.get("chat_template")
        self.special_tokens = {key: _content(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key)}
        self._template: Any = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:  # transformers' rewrite, which no plain tokenizer asks for
            raise ValueError("clean_up_tokenization_spaces=True: load the tokenizer through transformers")
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> Any:
        if self._template is None:
            self._template = _compile(self.chat_template)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                     documents=None, **self.special_tokens)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def plain_fast_tokenizer(model_dir: Path) -> Optional[FastTokenizer]:
    """A FastTokenizer for the directory, or None where transformers would differ."""
    config_path, json_path = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not config_path.exists() or not json_path.exists():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in PLAIN_CLASSES or config.get("clean_up_tokenization_spaces"):
        return None
    from tokenizers import Tokenizer

    fast = FastTokenizer(Tokenizer.from_file(str(json_path)), config)
    # transformers rewrites the post-processor to match add_bos_token/add_eos_token:
    # where tokenizer.json does otherwise, leave it to transformers.
    ids = fast.encode("a")
    for flag, token, at in (("add_bos_token", "bos_token", 0), ("add_eos_token", "eos_token", -1)):
        if flag in config and token in fast.special_tokens:
            added = ids[at] == fast.backend.token_to_id(fast.special_tokens[token])
            if added != bool(config[flag]):
                return None
    return fast


def _content(token: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    return token["content"] if isinstance(token, dict) else str(token)


def _compile(template: Optional[str]) -> Any:
    """The chat template in the sandboxed jinja2 environment transformers renders it in."""
    if template is None:
        raise ValueError("the model's tokenizer_config.json has no chat_template")
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
