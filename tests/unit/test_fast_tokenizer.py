"""The fast tokenizer (tokenizers + jinja2, no transformers), which router replicas and
workers load, gives the same ids and text as transformers' AutoTokenizer, which the
offline LLM hands its users; where it could not, both load transformers'."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer

from workers.models.fast_tokenizer import FastTokenizer, plain_fast_tokenizer
from workers.models.tokenizer import encode_chat, encode_prompt, load_tokenizer

TEXTS = ["", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnew\n\nlines\r\n", "naïve café — 日本語 🙂",
         "<s> a literal bos </s> and eos", "don't you'll we've", "1234567890 3.14159", "x" * 500,
         "mixed <|user|> markers", "\u00a0non-breaking\u2009spaces"]
CHATS = [[{"role": "user", "content": "Hi"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? 🙂"},
          {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and  \n 3+3?"}]]
# Uses what real templates use: loop controls, tojson, raise_exception, namespace, trim/lstrip.
RICH_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = 'default' %}{%- endif %}
{{- bos_token }}[SYS]{{ system | tojson }}
{%- for m in messages %}
    {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role: ' + m['role']) }}{% endif %}
    {%- if loop.index0 > 6 %}{% break %}{% endif %}
    {{- '<|' + m['role'] + '|>' + m['content'] | trim + eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2", "tiny-moe"])
def model_dir(request, make_model):
    return make_model(request.param)


def test_same_ids_and_text_as_transformers(model_dir):
    ours, theirs = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(str(model_dir))
    assert isinstance(ours, FastTokenizer)
    for text in TEXTS:
        ids = encode_prompt(ours, text)
        assert ids == encode_prompt(theirs, text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
        assert [ours.decode([i]) for i in ids] == [theirs.decode([i]) for i in ids]
    for chat in CHATS:
        assert encode_chat(ours, chat) == encode_chat(theirs, chat)


def test_a_rich_chat_template_renders_as_transformers_renders_it(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": RICH_TEMPLATE}))
    ours, theirs = load_tokenizer(copy), AutoTokenizer.from_pretrained(str(copy))
    assert isinstance(ours, FastTokenizer)
    for chat in CHATS + [[{"role": "user", "content": str(i)} for i in range(10)]]:
        assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat, add_generation_prompt=True,
                                                                           tokenize=False)
        assert encode_chat(ours, chat) == encode_chat(theirs, chat)
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(TemplateError, match="bad role: tool"):
        theirs.apply_chat_template(bad, tokenize=False)
    with pytest.raises(TemplateError, match="bad role: tool"):
        encode_chat(ours, bad)


@pytest.mark.parametrize("change", [{"tokenizer_class": "LlamaTokenizerFast"}, {"add_bos_token": False},
                                    {"add_eos_token": True}, {"clean_up_tokenization_spaces": True}])
def test_tokenizers_transformers_may_rebuild_are_left_to_transformers(make_model, tmp_path, change):
    copy = tmp_path / "model"
    shutil.copytree(make_model("tiny-llama"), copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, **change}))
    assert plain_fast_tokenizer(copy) is None
    ours, theirs = load_tokenizer(copy), AutoTokenizer.from_pretrained(str(copy))
    assert not isinstance(ours, FastTokenizer)
    assert encode_prompt(ours, "Hello, world!") == encode_prompt(theirs, "Hello, world!")


def test_a_router_replica_imports_neither_torch_nor_transformers(make_model):
    code = ("import sys, router.app, router.grpc_ingress; from workers.models.tokenizer import load_tokenizer; "
            f"load_tokenizer({str(make_model('tiny-llama'))!r}).encode('a'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_engine_starts_and_detokenizes_without_importing_transformers(make_model):
    """transformers' import is 4.5 s of every worker's start; a plain tokenizer needs none of it."""
    code = ("import sys; from workers.engine.engine import LLMEngine, EngineConfig; "
            "from workers.sampling_params import SamplingParams; "
            f"engine = LLMEngine(EngineConfig(model={str(make_model('tiny-llama'))!r})); "
            "engine.add_request('r', [1, 2, 3], SamplingParams(max_tokens=4)); "
            "outs = [o for _ in range(8) for o in engine.step()]; "
            "print('transformers' in sys.modules, sum(len(o.new_text) for o in outs) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False True"
