"""Each tensor-parallel rank's share of a staged KV payload, handed to that rank alone.

vLLM's `collective_rpc` sends one call's arguments to every rank, so a payload passed
as it is reaches each rank with every rank's share: with N ranks, N times the bytes
pickled, sent and read, inside a migration's pause. Instead the worker writes each
rank's share into a file of its own in shared memory (`/dev/shm`, or the temporary
directory where that has no room) and sends the ranks only where to find theirs;
each rank maps its own file. vLLM's ranks are processes on the worker's node (its
multiprocessing executor), so they see the worker's files. The worker removes the
files once every rank has read its share: `collective_rpc` returns after all have.
A worker killed mid-staging cannot remove its files; the next staging on the node
removes them (their names carry the writer's pid).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

Blocks = dict[str, torch.Tensor]  # one rank's: layer name → [num_blocks, *per-block shape]

_ALIGN = 64  # each tensor starts at a multiple of this in its file: aligned reads
_SHM = "/dev/shm"
_PREFIX = "yard-kv-"
_WRITER = re.compile(rf"{_PREFIX}(\d+)-")  # the pid of the process that wrote the file
# A file is an orphan when its writer is gone and it is older than this: a staging's
# files live for the seconds of one handover, and the age spares a file whose pid
# belongs to another pid namespace sharing the directory.
ORPHAN_AGE_S = 60.0


@dataclass(frozen=True, slots=True)
class TensorAt:
    """Where one layer's blocks lie in a share's file."""

    layer: str
    shape: tuple[int, ...]
    dtype: str  # as torch names it: "torch.bfloat16"
    offset: int  # bytes from the file's start


@dataclass(frozen=True, slots=True)
class RankShare:
    """One rank's share of a payload's parts: its file, and each part's first block
    and tensors in that file, in part order."""

    path: str
    parts: tuple[tuple[int, tuple[TensorAt, ...]], ...]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _share_bytes(parts: Sequence[tuple[int, Blocks]]) -> int:
    return sum(_aligned(t.numel() * t.element_size()) for _, blocks in parts for t in blocks.values())


def _directory(num_bytes: int) -> str:
    """Shared memory where it has room for these bytes (with a margin), else the
    temporary directory: a pod's /dev/shm may be small."""
    try:
        stat = os.statvfs(_SHM)
    except OSError:
        return tempfile.gettempdir()
    return _SHM if stat.f_bavail * stat.f_frsize > 2 * num_bytes else tempfile.gettempdir()


def _write_share(parts: Sequence[tuple[int, Blocks]], directory: str) -> RankShare:
    fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=directory)
    placed, offset = [], 0
    with os.fdopen(fd, "wb") as f:
        for first_block, blocks in parts:
            tensors = []
            for layer, t in sorted(blocks.items()):
                raw = t.detach().contiguous().view(-1).view(torch.uint8).numpy()  # no copy
                f.seek(offset)
                f.write(memoryview(raw))
                tensors.append(TensorAt(layer, tuple(t.shape), str(t.dtype), offset))
                offset += _aligned(raw.nbytes)
            placed.append((first_block, tuple(tensors)))
    return RankShare(path, tuple(placed))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: another user's process, alive
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_orphans(directory: str) -> None:
    """Removes the share files in the directory that a dead process left (a worker
    killed mid-staging), so that its shared memory is not held until the node goes.
    A scan of the directory: /dev/shm holds a few files."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            writer = _WRITER.match(entry.name)
            if writer is None or _alive(int(writer.group(1))):
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > ORPHAN_AGE_S:
                    os.remove(entry.path)


@contextlib.contextmanager
def published(shares: Sequence[Sequence[tuple[int, Blocks]]]) -> Iterator[list[RankShare]]:
    """Each rank's (first block, blocks) parts, in rank order, written to a file of
    its own; the files are removed on leaving, read or not."""
    written: list[RankShare] = []
    try:
        directory = _directory(max((_share_bytes(parts) for parts in shares), default=0))
        remove_orphans(directory)
        for parts in shares:
            written.append(_write_share(parts, directory))
        yield written
    finally:
        for share in written:
            with contextlib.suppress(FileNotFoundError):
                os.remove(share.path)


def read_share(share: RankShare) -> list[tuple[int, Blocks]]:
    """In a rank: its (first block, blocks) parts, mapped from its file, not copied:
    they are read once, when written into the request's blocks. (The worker removes
    the file once every rank has mapped its own; the pages live while mapped.)"""
    size = os.path.getsize(share.path)
    data = torch.from_file(share.path, shared=True, size=size, dtype=torch.uint8) if size else None
    parts = []
    for first_block, tensors in share.parts:
        blocks = {}
        for at in tensors:
            dtype = getattr(torch, at.dtype.removeprefix("torch."))
            nbytes = math.prod(at.shape) * dtype.itemsize
            raw = data[at.offset: at.offset + nbytes] if nbytes else torch.empty(0, dtype=torch.uint8)
            blocks[at.layer] = raw.view(dtype).view(at.shape)
        parts.append((first_block, blocks))
    return parts
