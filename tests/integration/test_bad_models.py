"""Broken model directories fail loudly, naming the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest

from workers import LLM
from workers.models.config import ModelConfigError
from workers.models.weights import ModelLoadError


@pytest.fixture
def model_copy(make_model, tmp_path):
    src = make_model("tiny-qwen2")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_architecture_is_named(model_copy):
    edit_config(model_copy, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ModelConfigError, match=r"config.json: unsupported architectures \['GPTNeoXForCausalLM'\]"):
        LLM(model=str(model_copy))


def test_missing_weight_files_are_named(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors") as err:
        LLM(model=str(model_copy))
    assert str(model_copy) in str(err.value)


def test_mismatched_tensor_shape_names_file_and_tensor(model_copy):
    edit_config(model_copy, intermediate_size=512)  # the checkpoint's MLP is 384 wide
    with pytest.raises(ModelLoadError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' in "
                                             r"model.safetensors has shape \(384, 128\), expected \(512, 128\)"):
        LLM(model=str(model_copy))


def test_missing_tensor_is_named(make_model, tmp_path):
    src = make_model("tiny-llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    edit_config(dst, num_hidden_layers=5)  # the checkpoint has 4 layers
    with pytest.raises(ModelLoadError, match="model.layers.4.self_attn.q_proj.weight"):
        LLM(model=str(dst))


def test_bad_dtype_and_missing_directory():
    with pytest.raises(ValueError, match="dtype must be one of .* got 'float8'"):
        LLM(model="tiny-llama", dtype="float8")
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-dir"):
        LLM(model="./no-such-dir")
