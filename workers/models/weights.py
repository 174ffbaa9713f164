"""Reading a model directory's safetensors checkpoint, with errors that name the file.

A checkpoint is `model.safetensors`, or `model.safetensors.index.json` whose
weight_map sends each tensor name to one shard file (Hugging Face's layout). Tensor
parallel ranks read only their own slices, so slices are read without materialising
the whole tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ModelLoadError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model's config."""


def expect_shape(name: str, tensor: torch.Tensor, shape: Sequence[int], file: str | Path) -> None:
    """Raise ModelLoadError unless tensor has exactly `shape`."""
    if tuple(tensor.shape) != tuple(shape):
        raise ModelLoadError(
            f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


class CheckpointFiles:
    """The weight files of one model directory, opened once and kept open until close().

    All files are opened (headers only; data is memory-mapped) at construction, so a
    missing shard, a corrupt header or an index that disagrees with its shards fails
    here, before any weight is read.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        self._handles: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = {}
        if (self.dir / SINGLE_FILE).is_file():  # preferred over an index, as transformers does
            file = self.dir / SINGLE_FILE
            self._file_of = {name: file for name in self._open(file).keys()}
        elif (self.dir / INDEX_FILE).is_file():
            self._read_index(self.dir / INDEX_FILE)
        else:
            others = sorted(p.name for p in self.dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            hint = f"; found only {others} (only safetensors checkpoints are supported)" if others else ""
            raise ModelLoadError(f"no weight files in {self.dir}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def _read_index(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not an object of file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"corrupt checkpoint index {index_path}: {e!r}") from e
        by_file: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(name)
        for file_name, names in sorted(by_file.items()):
            file = self.dir / file_name
            if not file.is_file():
                raise ModelLoadError(
                    f"{index_path} maps {len(names)} tensors (e.g. {names[0]!r}) to {file_name}, which does not exist in {self.dir}")
            present = set(self._open(file).keys())
            for name in names:
                if name not in present:
                    raise ModelLoadError(f"{index_path} maps tensor {name!r} to {file}, which does not contain it")
                self._file_of[name] = file

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"corrupt or unreadable safetensors file {file}: {e}") from e
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        if name not in self._file_of:
            raise ModelLoadError(f"tensor {name!r} is not in the checkpoint in {self.dir}")
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of(name)).get_slice(name).get_shape())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        file = self.file_of(name)
        try:
            tensor = self._open(file).get_tensor(name)
        except SafetensorError as e:
            raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {e}") from e
        return tensor if dtype is None else tensor.to(dtype)

    def get_slice(self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """tensor[..., start:stop, ...] along `dim`, reading only those bytes from disk."""
        file = self.file_of(name)
        shape = self.shape(name)
        if not 0 <= dim < len(shape) or not 0 <= start < stop <= shape[dim]:
            raise ModelLoadError(
                f"slice [{start}:{stop}] of dim {dim} is out of range for tensor {name!r} in {file} with shape {shape}")
        index = (slice(None),) * dim + (slice(start, stop),)
        try:
            tensor = self._open(file).get_slice(name)[index]
        except SafetensorError as e:
            raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {e}") from e
        return tensor if dtype is None else tensor.to(dtype)

    def get_expected(self, name: str, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """get(), checked against the shape the model's config implies."""
        tensor = self.get(name, dtype)
        expect_shape(name, tensor, shape, self.file_of(name))
        return tensor

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
