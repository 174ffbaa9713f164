"""The CPU decode-attention kernel: built from paged_decode.c on first use, then cached.

The C file has no dependency but libc and OpenMP, so the machine's C compiler builds
it in about a second; the shared library lands in the model cache's sibling folder
under a name that hashes the source, the flags and the compiler, and is renamed into
place atomically so concurrent builders never load half a file. Where no compiler
is found, or the build fails, `load_decode_kernel` returns None and attention falls
back to the plain PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from workers.models.tiny import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
# Fast math, part by part: reassociation and no errno let the compiler vectorize
# the dot products and expf (the reordered float sums stay within a few ulps of the
# reference). Not -ffast-math itself: a library linked with it sets the CPU to flush
# subnormals to zero when it loads, for the whole process that loads it.
FLAGS = ("-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-freciprocal-math", "-fno-math-errno", "-ffinite-math-only", "-fopenmp", "-shared", "-fPIC")

DecodeKernel = Callable[..., None]


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode())
    return cache_root().parent / "kernels" / f"paged_decode-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def load_decode_kernel() -> Optional[DecodeKernel]:
    """The compiled kernel as a Python callable, or None where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: decode attention uses the PyTorch path")
        return None
    try:
        path = _library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the CPU decode kernel failed, using the PyTorch path: %s", detail)
        return None
    fn = lib.paged_decode_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int]
    return functools.partial(_call, fn)


def _call(fn: ctypes._CFuncPtr, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
          tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, heads, head_dim] float32; caches [blocks, block_size, kv_heads, head_dim]."""
    q = q.contiguous()
    out = torch.empty_like(q)
    n, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    status = fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                out.data_ptr(), n, heads, kv_heads, head_dim, block_size, tables.shape[1], scale,
                torch.get_num_threads())
    if status != 0:
        raise MemoryError("paged decode kernel could not allocate its scratch buffer")
    return out
