"""CheckpointFiles reads single and sharded safetensors checkpoints; errors name the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.models.tiny import make_tiny_model
from workers.models.weights import CheckpointFiles, ModelLoadError, expect_shape

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="session")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("tiny-qwen2", tmp_path_factory.mktemp("weights") / "single")


@pytest.fixture(scope="session")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("tiny-qwen2", tmp_path_factory.mktemp("weights") / "sharded", shards=2)


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / model_dir.name))


def test_single_file(single: Path) -> None:
    expected = load_file(single / "model.safetensors")
    with CheckpointFiles(single) as ckpt:
        assert ckpt.names() == sorted(expected)
        assert ckpt.file_of(Q0) == single / "model.safetensors"
        assert all(torch.equal(ckpt.get(n), t) for n, t in expected.items())
        assert ckpt.shape(Q0) == (128, 128)
        assert ckpt.get(Q0, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sharded_reads_like_single(single: Path, sharded: Path) -> None:
    with CheckpointFiles(single) as one, CheckpointFiles(sharded) as many:
        assert many.names() == one.names()
        assert all(torch.equal(many.get(n), one.get(n)) for n in one.names())
        assert many.file_of("model.embed_tokens.weight") == sharded / "model-00001-of-00002.safetensors"
        assert many.file_of("model.norm.weight") == sharded / "model-00002-of-00002.safetensors"


def test_get_slice_reads_a_part(sharded: Path) -> None:
    with CheckpointFiles(sharded) as ckpt:
        whole = ckpt.get(Q0)
        assert torch.equal(ckpt.get_slice(Q0, 0, 32, 64), whole[32:64])
        assert torch.equal(ckpt.get_slice(Q0, 1, 0, 16), whole[:, :16])
        bias = "model.layers.1.self_attn.v_proj.bias"
        assert torch.equal(ckpt.get_slice(bias, 0, 32, 64, dtype=torch.float16), ckpt.get(bias)[32:64].half())


def test_close_releases_handles(single: Path) -> None:
    ckpt = CheckpointFiles(single)
    ckpt.close()
    assert ckpt._handles == {}
    assert ckpt.get("model.norm.weight").shape == (128,)  # reopens on demand
    ckpt.close()


def test_no_weight_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(
            f"no weight files in {tmp_path}: expected model.safetensors or model.safetensors.index.json")):
        CheckpointFiles(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=re.escape(
            "found only ['pytorch_model.bin'] (only safetensors checkpoints are supported)")):
        CheckpointFiles(tmp_path)


def test_index_names_a_missing_shard(sharded: Path, tmp_path: Path) -> None:
    model = copy_of(sharded, tmp_path)
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError) as err:
        CheckpointFiles(model)
    message = str(err.value)
    assert message.startswith(f"{model / 'model.safetensors.index.json'} maps ")
    assert message.endswith(f"to model-00002-of-00002.safetensors, which does not exist in {model}")


def test_index_names_a_tensor_its_shard_lacks(sharded: Path, tmp_path: Path) -> None:
    model = copy_of(sharded, tmp_path)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=re.escape(
            f"maps tensor 'model.extra.weight' to {model / 'model-00001-of-00002.safetensors'}, which does not contain it")):
        CheckpointFiles(model)


def test_corrupt_index(sharded: Path, tmp_path: Path) -> None:
    model = copy_of(sharded, tmp_path)
    (model / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=re.escape(f"corrupt checkpoint index {model / 'model.safetensors.index.json'}")):
        CheckpointFiles(model)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_file(single: Path, tmp_path: Path, damage: str) -> None:
    model = copy_of(single, tmp_path)
    file = model / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=re.escape(f"corrupt or unreadable safetensors file {file}: ")):
        CheckpointFiles(model)


def test_missing_tensor_names_tensor_and_dir(single: Path) -> None:
    with CheckpointFiles(single) as ckpt:
        assert "lm_head.weight" not in ckpt  # tied
        with pytest.raises(ModelLoadError, match=re.escape(f"tensor 'lm_head.weight' is not in the checkpoint in {single}")):
            ckpt.get("lm_head.weight")


def test_slice_out_of_range_names_tensor_and_file(single: Path) -> None:
    with CheckpointFiles(single) as ckpt:
        with pytest.raises(ModelLoadError, match=re.escape(
                f"slice [96:160] of dim 0 is out of range for tensor '{Q0}' in {single / 'model.safetensors'} with shape (128, 128)")):
            ckpt.get_slice(Q0, 0, 96, 160)
        with pytest.raises(ModelLoadError, match="slice \\[0:1\\] of dim 2 is out of range"):
            ckpt.get_slice(Q0, 2, 0, 1)


def test_expect_shape_message() -> None:
    with pytest.raises(ModelLoadError) as err:
        expect_shape(Q0, torch.zeros(4, 8), (8, 4), "model-00001-of-00002.safetensors")
    assert str(err.value) == (
        "tensor 'model.layers.0.self_attn.q_proj.weight' in model-00001-of-00002.safetensors "
        "has shape (4, 8), expected (8, 4)")
    expect_shape(Q0, torch.zeros(4, 8), [4, 8], "f")  # a matching shape passes


def test_get_expected_checks_against_the_config(sharded: Path) -> None:
    with CheckpointFiles(sharded) as ckpt:
        assert ckpt.get_expected(Q0, (128, 128)).shape == (128, 128)
        with pytest.raises(ModelLoadError, match=re.escape(
                f"tensor '{Q0}' in {sharded / 'model-00001-of-00002.safetensors'} has shape (128, 128), expected (256, 128)")):
            ckpt.get_expected(Q0, (256, 128))
