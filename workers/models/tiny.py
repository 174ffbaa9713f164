"""Seeded random models in Hugging Face's on-disk format, for tests and benchmarks.

Nothing can be downloaded from a model hub here, so tests build their own checkpoints:
the config.json, safetensors files (single or sharded with an index), byte-level BPE
tokenizer and chat template look exactly like real hub checkpoints, so the loader
that reads these reads real ones too. The same (kind, seed, dtype, shards, overrides)
always gives byte-identical files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where weights are made: routers resolve presets without torch
    import torch

CORPUS_PATH = Path(__file__).with_name("tiny_corpus.txt")
TOKENIZER_VOCAB_SIZE = 1024
# Part of the cache directory name: bump it when the weights, tokenizer or config a
# preset makes change, so an old cache is never silently reused.
FORMAT_VERSION = 1
# Llama's ids for the first three, then a pad token and chat role markers.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Zephyr-style: each turn ends with eos, so a model stops at the end of its answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split (words, single digits, punctuation runs, whitespace).
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_cache": True,
    "attention_dropout": 0.0,
    "rope_scaling": None,
    "max_position_embeddings": 2048,
    "vocab_size": TOKENIZER_VOCAB_SIZE,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
_MIXTRAL: dict[str, Any] = {
    **_COMMON,
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "output_router_logits": False, "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0,
    "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False,
}
# Config dicts as hub checkpoints write them (rope_theta/rope_scaling, torch_dtype).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        **_COMMON, **_LLAMA,
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
    },
    "tiny-moe": {
        **_MIXTRAL,
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    # tiny-moe with skewed, layer-to-layer correlated routing (affinity_routing.py), for
    # expert placement: 16 experts, 6 layers, top-2.
    "tiny-moe-affinity": {
        **_MIXTRAL,
        "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_local_experts": 16, "num_experts_per_tok": 2,
    },
    # Like hub Qwen2 configs: no head_dim key (it is hidden/heads) and q/k/v always biased.
    "tiny-qwen2": {
        **_COMMON,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "use_sliding_window": False, "sliding_window": 2048, "max_window_layers": 4,
        "tie_word_embeddings": True,
    },
    "llama-100m": {
        **_COMMON, **_LLAMA,
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64,
    },
}


def model_config(kind: str, dtype: str = "float32", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json contents for a preset, with overrides applied last."""
    if kind not in PRESETS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    config = copy.deepcopy(PRESETS[kind])
    config["torch_dtype"] = dtype
    config.update(copy.deepcopy(overrides or {}))
    if config["vocab_size"] < TOKENIZER_VOCAB_SIZE:
        raise ValueError(f"vocab_size {config['vocab_size']} is smaller than the tokenizer's {TOKENIZER_VOCAB_SIZE}")
    return dict(sorted(config.items()))


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes, in the module order HF checkpoints store them."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    # Qwen2 always biases q/k/v (not o); Llama's attention_bias biases all four.
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    o_bias = config["model_type"] != "qwen2" and config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, out_dim in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (out_dim, h)
            if qkv_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (out_dim,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, heads * head_dim)
        if o_bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (h,)
        if config["model_type"] == "mixtral":
            shapes[f"{p}block_sparse_moe.gate.weight"] = (config["num_local_experts"], h)
            for e in range(config["num_local_experts"]):
                # Hub Mixtral names: w1 = gate, w2 = down, w3 = up.
                shapes[f"{p}block_sparse_moe.experts.{e}.w1.weight"] = (inter, h)
                shapes[f"{p}block_sparse_moe.experts.{e}.w2.weight"] = (h, inter)
                shapes[f"{p}block_sparse_moe.experts.{e}.w3.weight"] = (inter, h)
        else:
            for proj, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
                shapes[f"{p}mlp.{proj}_proj.weight"] = shape
                if mlp_bias:
                    shapes[f"{p}mlp.{proj}_proj.bias"] = (shape[0],)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def init_tensor(name: str, shape: tuple[int, ...], seed: int) -> "torch.Tensor":
    """One tensor, from a generator seeded by (seed, name): a tensor's values do not
    depend on which other tensors exist (tied or not, sharded or not).

    Scales give logits a clear spread (std ~2 over the vocab, so greedy decoding has
    no near-ties) and sharp enough attention that greedy output varies instead of
    repeating one token: matrices N(0, 4/fan_in), the embedding N(0, 1/hidden) (as
    the tied lm_head of Qwen2 it would otherwise echo the last token), norm weights
    1 + N(0, 0.2) and biases N(0, 0.5), large enough that a loader that drops a norm
    or a bias visibly changes the output.
    """
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name == "model.embed_tokens.weight":
        return noise / shape[1] ** 0.5
    if len(shape) == 2:
        return noise * (2.0 / shape[1] ** 0.5)
    if name.endswith("norm.weight"):
        return 1.0 + 0.2 * noise
    return 0.5 * noise


def split_shards(sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Consecutive groups of names with about equal bytes, none empty (like HF's
    max_shard_size split, but by count)."""
    names = list(sizes)
    if not 1 <= shards <= len(names):
        raise ValueError(f"shards must be between 1 and {len(names)}, got {shards}")
    target = sum(sizes.values()) / shards
    groups: list[list[str]] = [[]]
    filled = 0
    for i, name in enumerate(names):
        # As many names left (this one included) as groups still to open: split now.
        must_split = len(names) - i == shards - len(groups) and groups[-1]
        want_split = filled + sizes[name] / 2 > target * len(groups) and groups[-1]
        if len(groups) < shards and (must_split or want_split):
            groups.append([])
        groups[-1].append(name)
        filled += sizes[name]
    return groups


def write_weights(tensors: dict[str, "torch.Tensor"], out_dir: Path, shards: int) -> None:
    """model.safetensors, or HF-named shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    if shards == 1:
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        return
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    weight_map: dict[str, str] = {}
    for k, group in enumerate(split_shards(sizes, shards), start=1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, out_dir / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    write_json(out_dir / "model.safetensors.index.json", index)


def build_tokenizer() -> Any:
    """A byte-level BPE (Llama 3 / Qwen2 style) trained on the embedded corpus.

    NFC plus Qwen2's split regex, because transformers ignores tokenizer.json's
    normalizer and pre-tokenizer for model_type qwen2 and forces these: with them,
    `tokenizers` and AutoTokenizer encode alike for every kind. The trainer is
    deterministic (ties break on token ids, alphabet sorted), so the same corpus
    always gives the same tokenizer.json; a test checks the bytes."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    if tok.get_vocab_size() != TOKENIZER_VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {TOKENIZER_VOCAB_SIZE}; corpus too small")
    # As Qwen2Tokenizer rebuilds the model (same behaviour; makes the two JSONs equal).
    tok.model.continuing_subword_prefix = ""
    tok.model.end_of_word_suffix = ""
    # Adds bos to every encoding, as Llama's tokenizers do.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]),
    ])
    return tok


def write_tokenizer(out_dir: Path, config: dict[str, Any]) -> None:
    (out_dir / "tokenizer.json").write_text(build_tokenizer().to_str(pretty=True) + "\n", encoding="utf-8")
    write_json(out_dir / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": config["max_position_embeddings"],
        "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    })


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tiny_model(
    kind: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a seeded random `kind` model into out_dir (created if needed); returns it."""
    config = model_config(kind, dtype, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Generated in float32 then cast, so every dtype holds the same values rounded.
    shapes = tensor_shapes(config)
    import torch

    tensors = {n: init_tensor(n, s, seed) for n, s in sorted(shapes.items())}
    if kind == "tiny-moe-affinity":
        from workers.models import affinity_routing

        affinity_routing.apply(tensors, config, seed)
    tensors = {n: t.to(getattr(torch, dtype)) for n, t in tensors.items()}
    write_weights({n: tensors[n] for n in shapes}, out, shards)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {
        "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
    })
    write_tokenizer(out, config)
    return out


def cache_root() -> Path:
    """Where preset models are cached: $YARD_CACHE_DIR, else ~/.cache/yard/models."""
    env = os.environ.get("YARD_CACHE_DIR")
    if env is not None and not env.strip():
        raise ValueError("YARD_CACHE_DIR is set but empty")
    return Path(env) if env else Path.home() / ".cache" / "yard" / "models"


def resolve_model(name_or_dir: str, seed: int = 0) -> Path:
    """A preset name (made in the cache if absent) or a model directory, as a Path.

    Preset names win over a same-named relative directory; write `./tiny-llama` for that.
    """
    if name_or_dir in PRESETS:
        final = cache_root() / f"{name_or_dir}-seed{seed}-v{FORMAT_VERSION}"
        if not (final / "config.json").is_file():
            final.parent.mkdir(parents=True, exist_ok=True)
            # Build in a private sibling and rename: rename is atomic, so a concurrent
            # reader sees either no model or a whole one, and one of two racing makers wins.
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is not secret
            try:
                make_tiny_model(name_or_dir, tmp, seed=seed)
                os.rename(tmp, final)
            except OSError:
                if not (final / "config.json").is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final
    path = Path(name_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_dir!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return path
