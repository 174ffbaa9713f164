"""The tiny-model factory writes exactly what Hugging Face writes and reads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from cluster.cli import MODEL_KINDS, main
from workers.models.tiny import (FORMAT_VERSION, PRESETS, TOKENIZER_VOCAB_SIZE, make_tiny_model, resolve_model,
                                 split_shards)
from workers.models.weights import CheckpointFiles

KINDS = ["tiny-llama", "tiny-moe", "tiny-qwen2"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model made once for the whole session."""
    root = tmp_path_factory.mktemp("tiny")
    made = {kind: make_tiny_model(kind, root / kind) for kind in KINDS}
    made["llama-again"] = make_tiny_model("tiny-llama", root / "llama-again")
    made["llama-seed1"] = make_tiny_model("tiny-llama", root / "llama-seed1", seed=1)
    made["llama-sharded"] = make_tiny_model("tiny-llama", root / "llama-sharded", shards=3)
    made["llama-bf16"] = make_tiny_model("tiny-llama", root / "llama-bf16", dtype="bfloat16")
    made["llama-variant"] = make_tiny_model("tiny-llama", root / "llama-variant", overrides={
        "tie_word_embeddings": True, "attention_bias": True, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE})
    return made


def files_of(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir())}


def hf_load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    return model


def expected_hf_params(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under transformers 5's parameter names: Mixtral experts are
    fused on load into gate_up_proj [E, 2I, H] (w1 then w3) and down_proj [E, H, I]."""
    if config["model_type"] != "mixtral":
        return tensors
    out = {n: t for n, t in tensors.items() if "block_sparse_moe" not in n}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe."
        experts = range(config["num_local_experts"])
        out[f"model.layers.{i}.mlp.gate.weight"] = tensors[p + "gate.weight"]
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}experts.{e}.w1.weight"], tensors[f"{p}experts.{e}.w3.weight"]]) for e in experts])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([tensors[f"{p}experts.{e}.w2.weight"] for e in experts])
    return out


def test_same_seed_gives_byte_identical_files(models: dict[str, Path]) -> None:
    assert files_of(models["tiny-llama"]) == files_of(models["llama-again"])
    assert sorted(files_of(models["tiny-llama"])) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_other_seed_changes_only_the_weights(models: dict[str, Path]) -> None:
    a, b = files_of(models["tiny-llama"]), files_of(models["llama-seed1"])
    assert a["model.safetensors"] != b["model.safetensors"]
    assert {k: v for k, v in a.items() if k != "model.safetensors"} == {k: v for k, v in b.items() if k != "model.safetensors"}
    wa, wb = load_file(models["tiny-llama"] / "model.safetensors"), load_file(models["llama-seed1"] / "model.safetensors")
    assert all(not torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_exactly_the_checkpoint(models: dict[str, Path], kind: str) -> None:
    model = hf_load(models[kind])
    config = json.loads((models[kind] / "config.json").read_text())
    expected = expected_hf_params(load_file(models[kind] / "model.safetensors"), config)
    params = dict(model.named_parameters())  # tied lm_head is not listed separately
    assert sorted(params) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(params[name].detach(), tensor), name
    assert model.config.tie_word_embeddings == config["tie_word_embeddings"]


def test_preset_configs(models: dict[str, Path]) -> None:
    llama = json.loads((models["tiny-llama"] / "config.json").read_text())
    assert llama["architectures"] == ["LlamaForCausalLM"]
    assert (llama["hidden_size"], llama["num_hidden_layers"], llama["num_attention_heads"],
            llama["num_key_value_heads"], llama["head_dim"], llama["intermediate_size"]) == (256, 4, 8, 4, 32, 768)
    assert (llama["vocab_size"], llama["bos_token_id"], llama["eos_token_id"]) == (TOKENIZER_VOCAB_SIZE, 1, 2)
    assert (llama["rope_theta"], llama["rope_scaling"], llama["torch_dtype"]) == (10000.0, None, "float32")
    moe = json.loads((models["tiny-moe"] / "config.json").read_text())
    assert (moe["model_type"], moe["num_local_experts"], moe["num_experts_per_tok"]) == ("mixtral", 8, 2)
    qwen = json.loads((models["tiny-qwen2"] / "config.json").read_text())
    assert (qwen["model_type"], qwen["tie_word_embeddings"], "head_dim" in qwen) == ("qwen2", True, False)
    with CheckpointFiles(models["tiny-qwen2"]) as ckpt:
        assert "lm_head.weight" not in ckpt
        assert ckpt.shape("model.layers.3.self_attn.k_proj.bias") == (64,)
        assert "model.layers.0.self_attn.o_proj.bias" not in ckpt


def test_llama_100m_has_about_100m_parameters() -> None:
    from workers.models.tiny import model_config, tensor_shapes

    shapes = tensor_shapes(model_config("llama-100m"))
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 105_401_088


def test_overrides_change_config_and_weights(models: dict[str, Path]) -> None:
    config = json.loads((models["llama-variant"] / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["attention_bias"], config["rope_scaling"]) == (True, True, LLAMA3_ROPE)
    with CheckpointFiles(models["llama-variant"]) as ckpt:
        assert "lm_head.weight" not in ckpt
        assert [n for n in ckpt.names() if n.startswith("model.layers.0.") and n.endswith("bias")] == [
            f"model.layers.0.self_attn.{p}_proj.bias" for p in "koqv"]
    model = hf_load(models["llama-variant"])
    assert model.config.rope_parameters == {**LLAMA3_ROPE, "rope_theta": 500000.0}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_equals_single(models: dict[str, Path]) -> None:
    sharded = models["llama-sharded"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == files
    assert sorted(set(index["weight_map"].values())) == files
    single = load_file(models["tiny-llama"] / "model.safetensors")
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in single.values())}
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[2]
    merged = {n: t for f in files for n, t in load_file(sharded / f).items()}
    assert sorted(merged) == sorted(single) == sorted(index["weight_map"])
    assert all(torch.equal(merged[n], single[n]) for n in single)
    model = hf_load(sharded)
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight.detach(), single["model.layers.3.mlp.down_proj.weight"])


def test_split_shards_keeps_order_and_fills_every_shard() -> None:
    sizes = {"a": 10, "b": 10, "c": 10, "d": 10}
    assert split_shards(sizes, 2) == [["a", "b"], ["c", "d"]]
    assert split_shards({"big": 100, "x": 1, "y": 1}, 3) == [["big"], ["x"], ["y"]]
    with pytest.raises(ValueError, match="shards must be between 1 and 4, got 5"):
        split_shards(sizes, 5)


def test_bfloat16_holds_the_float32_values_rounded(models: dict[str, Path]) -> None:
    f32 = load_file(models["tiny-llama"] / "model.safetensors")
    bf16 = load_file(models["llama-bf16"] / "model.safetensors")
    assert all(bf16[n].dtype == torch.bfloat16 and torch.equal(bf16[n], f32[n].to(torch.bfloat16)) for n in f32)
    assert json.loads((models["llama-bf16"] / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_round_trips_and_agrees_with_transformers(models: dict[str, Path], kind: str) -> None:
    from transformers import AutoTokenizer

    text = "The baker's bread, 12345 loaves!\n\tÜnïcödé café 😀  two  spaces"
    raw = Tokenizer.from_file(str(models[kind] / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(models[kind])  # Qwen2Tokenizer for qwen2: rebuilds the pipeline
    ids = raw.encode(text).ids
    assert ids[0] == 1 and 1 not in ids[1:]  # bos added once, by the post-processor
    assert hf(text).input_ids == ids
    assert raw.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id, len(hf)) == (1, 2, 3, 0, 1024)


def test_chat_template_renders(models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(models["tiny-llama"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    assert hf.apply_chat_template(messages[1:], tokenize=False) == "<s><|user|>\nHi there</s>\n"
    ids = hf.apply_chat_template(messages[1:], add_generation_prompt=True, return_dict=False)
    assert ids[:2] == [1, 5] and ids[-2:] == [6, 205] and ids.count(1) == 1  # no second bos
    # A router that renders the template itself and lets the tokenizer add bos agrees.
    raw = Tokenizer.from_file(str(models["tiny-llama"] / "tokenizer.json"))
    assert ids == raw.encode("<|user|>\nHi there</s>\n<|assistant|>\n").ids


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_varies(models: dict[str, Path], kind: str) -> None:
    """Random weights must not collapse to repeating one token, and logits must not tie."""
    from transformers import AutoTokenizer

    model, tok = hf_load(models[kind]), AutoTokenizer.from_pretrained(models[kind])
    prompt = torch.tensor([tok("The morning was cold").input_ids])
    out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, prompt.shape[1]:]
    assert len(set(out.tolist())) >= 16
    with torch.no_grad():
        top2 = model(out[None]).logits[0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.05


def test_resolve_model_makes_preset_once_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YARD_CACHE_DIR", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("tiny-qwen2"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / f"tiny-qwen2-seed0-v{FORMAT_VERSION}"] * 2
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-qwen2-seed0-v{FORMAT_VERSION}"]  # no temp dirs left behind
    mtime = (tmp_path / f"tiny-qwen2-seed0-v{FORMAT_VERSION}" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny-qwen2") == tmp_path / f"tiny-qwen2-seed0-v{FORMAT_VERSION}"
    assert (tmp_path / f"tiny-qwen2-seed0-v{FORMAT_VERSION}" / "model.safetensors").stat().st_mtime_ns == mtime


def test_resolve_model_directories(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model(str(models["tiny-moe"])) == models["tiny-moe"]
    with pytest.raises(FileNotFoundError, match=f"model '{tmp_path / 'nope'}' is neither a preset"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=f"model directory {tmp_path} has no config.json"):
        resolve_model(str(tmp_path))
    monkeypatch.setenv("YARD_CACHE_DIR", " ")
    with pytest.raises(ValueError, match="YARD_CACHE_DIR is set but empty"):
        resolve_model("tiny-llama")


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model kind 'tiny-gpt'"):
        make_tiny_model("tiny-gpt", tmp_path)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        make_tiny_model("tiny-llama", tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the tokenizer's 1024"):
        make_tiny_model("tiny-llama", tmp_path, overrides={"vocab_size": 100})


def test_cli_model_make_writes_the_same_files(models: dict[str, Path], tmp_path: Path) -> None:
    assert MODEL_KINDS == tuple(PRESETS)
    assert main(["model", "make", "tiny-llama", "--out", str(tmp_path / "m"), "--shards", "3"]) == 0
    assert files_of(tmp_path / "m") == files_of(models["llama-sharded"])
    with pytest.raises(SystemExit) as exit_info:
        main(["model", "make", "tiny-gpt", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert main(["model", "make", "tiny-llama", "--out", str(tmp_path / "y"), "--shards", "999"]) == 2
