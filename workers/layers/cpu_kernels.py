"""The compiled CPU kernels: built from their C files on first use, then cached.

paged_decode.c is decode attention over the paged KV cache; prefill_attention.c is a
prefill chunk's causal attention over its context; rotary.c applies rotary position
embeddings in place; swiglu.c is the MLP's silu(gate) * up; rms_norm.c is RMSNorm,
with or without the residual sum before it. None depends on
anything but libc and OpenMP, so the machine's C compiler builds each in about a
second; the shared library lands in the model cache's sibling folder under a name
that hashes the source and its headers, the flags, the compiler and the CPU
(-march=native code may not run on another CPU sharing the folder), and is renamed
into place atomically so concurrent builders never load half a file. Where no compiler is found, or a build fails, the loaders return None and the
layers fall back to their plain PyTorch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from workers.models.tiny import cache_root

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COMMON_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Fast math, part by part: reassociation and no errno let the compiler vectorize
# the dot products and expf (the reordered float sums stay within a few ulps of the
# reference). Not -ffast-math itself: a library linked with it sets the CPU to flush
# subnormals to zero when it loads, for the whole process that loads it.
FAST_MATH_FLAGS = COMMON_FLAGS + ("-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
                                  "-freciprocal-math", "-fno-math-errno", "-ffinite-math-only")
# Every product and sum rounded on its own, as PyTorch's operators round them.
EXACT_FLAGS = COMMON_FLAGS + ("-ffp-contract=off",)
# No reordered sums: the compiler may not split a sum into partial sums differently in
# two copies of a loop, so a row's result does not depend on which copy computed it.
ORDERED_FLAGS = COMMON_FLAGS + ("-fno-math-errno",)

DecodeKernel = Callable[..., None]
PrefillKernel = Callable[..., None]
RotaryKernel = Callable[..., None]
RmsNormKernel = Callable[..., torch.Tensor]
AddRmsNormKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
SwigluKernel = Callable[[torch.Tensor], torch.Tensor]


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu() -> bytes:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)})).encode()


def _library_path(compiler: str, source: Path, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode() + version.encode() + _cpu())
    return cache_root().parent / "kernels" / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, source: Path, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def _library(source_name: str, flags: tuple[str, ...]) -> Optional[ctypes.CDLL]:
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: %s's work runs in PyTorch", source_name)
        return None
    source = HERE / source_name
    try:
        path = _library_path(compiler, source, flags)
        if not path.exists():
            _build(compiler, source, flags, path)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building %s failed, its work runs in PyTorch: %s", source_name, detail)
        return None


@functools.lru_cache(maxsize=1)
def load_decode_kernel() -> Optional[DecodeKernel]:
    """The compiled decode attention as a Python callable, or None where it cannot be built."""
    lib = _library("paged_decode.c", FAST_MATH_FLAGS)
    if lib is None:
        return None
    fn = lib.paged_decode_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int]
    return functools.partial(_attend, fn)


def load_prefill_kernel(heads: int, kv_heads: int, head_dim: int) -> Optional[PrefillKernel]:
    """The compiled causal attention of a prefill chunk, for this head layout, as a
    Python callable, called as kernel(q, k, v, out, scale); None where it cannot be built or does not take the layout
    (head_dim a multiple of 8 up to 256, at most 16 query heads per KV head)."""
    if head_dim % 8 or head_dim > 256 or heads % kv_heads or heads // kv_heads > 16:
        return None
    lib = _library("prefill_attention.c", ORDERED_FLAGS)
    if lib is None:
        return None
    fn = lib.prefill_causal_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                                          ctypes.c_int, ctypes.c_float, ctypes.c_int]
    return functools.partial(_prefill_causal, fn)


def _prefill_causal(fn: ctypes._CFuncPtr, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    scale: float) -> None:
    """q, out: [tokens, heads, head_dim] for the last `tokens` positions of a context whose
    keys and values are k, v: [context, kv_heads, head_dim]; float32, each head's values
    contiguous (rows may be strided). Writes out."""
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if x.dtype != torch.float32 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
            raise ValueError(f"prefill kernel: {name} must be float32 with contiguous heads, "
                             f"got {x.dtype} strides {tuple(x.stride())}")
    status = fn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), out.data_ptr(),
                out.stride(0), q.shape[0], k.shape[0], q.shape[1], k.shape[1], q.shape[2], scale,
                torch.get_num_threads())
    if status != 0:
        raise MemoryError("prefill attention kernel could not allocate its scratch buffers")


@functools.lru_cache(maxsize=1)
def load_rotary_kernel() -> Optional[RotaryKernel]:
    """The compiled in-place rotary embedding as a Python callable, or None where it
    cannot be built. Called as kernel(q, k, positions, cos, sin)."""
    lib = _library("rotary.c", EXACT_FLAGS)
    if lib is None:
        return None
    fn = lib.rotary_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_int]
    return functools.partial(_rotate_in_place, fn)


@functools.lru_cache(maxsize=1)
def load_swiglu_kernel() -> Optional[SwigluKernel]:
    """The compiled silu(gate) * up as a Python callable, or None where it cannot be
    built. Called as kernel(gate_up) on float32 rows [gate | up] whose columns are
    contiguous; returns a new [rows, width] tensor."""
    lib = _library("swiglu.c", FAST_MATH_FLAGS)
    if lib is None:
        return None
    fn = lib.silu_mul_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return functools.partial(_silu_mul, fn)


def _silu_mul(fn: ctypes._CFuncPtr, gate_up: torch.Tensor) -> torch.Tensor:
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype)
    fn(gate_up.data_ptr(), rows, width, gate_up.stride(0), out.data_ptr(), torch.get_num_threads())
    return out


@functools.lru_cache(maxsize=1)
def load_rms_norm_kernels() -> Optional[tuple[RmsNormKernel, AddRmsNormKernel]]:
    """The compiled RMSNorm, called as norm(x, weight, eps) -> out, and RMSNorm of a
    residual sum, called as add_norm(x, delta, weight, eps) -> (x + delta, out), on
    contiguous float32 [rows, dim] tensors; None where they cannot be built."""
    lib = _library("rms_norm.c", EXACT_FLAGS)
    if lib is None:
        return None
    norm, add_norm = lib.rms_norm_f32, lib.add_rms_norm_f32
    norm.restype = add_norm.restype = None
    norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    add_norm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    return functools.partial(_rms_norm, norm), functools.partial(_add_rms_norm, add_norm)


def _rms_norm(fn: ctypes._CFuncPtr, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    fn(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def _add_rms_norm(fn: ctypes._CFuncPtr, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total, out = torch.empty_like(x), torch.empty_like(x)
    fn(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), total.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
       eps, torch.get_num_threads())
    return total, out


def _rotate_in_place(fn: ctypes._CFuncPtr, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim] float32, each head's
    values contiguous (rows may be strided); cos, sin: [max_positions, head_dim / 2]."""
    positions = positions.contiguous()
    status = fn(q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1], q.shape[2],
                positions.data_ptr(), q.shape[0], cos.data_ptr(), sin.data_ptr(), cos.shape[0],
                torch.get_num_threads())
    if status != 0:
        bad = positions[(positions < 0) | (positions >= cos.shape[0])][0].item()
        raise IndexError(f"position {bad} is outside the rotary table of {cos.shape[0]} positions")


def _attend(fn: ctypes._CFuncPtr, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
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
