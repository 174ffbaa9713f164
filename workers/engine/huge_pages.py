"""A CPU KV cache on 2 MiB pages, where Linux gives them.

A decode step reads every running sequence's keys and values, block by block, from
wherever the block table points in a cache of a gigabyte or more: with 4 KiB pages
almost every block costs a TLB miss. Linux backs memory with 2 MiB pages when the
process asks for it (`madvise(MADV_HUGEPAGE)`; most distributions and containers run
transparent huge pages in that "madvise" mode). On a 2-core machine the decode
kernel's share of a 200-sequence decode step went from ~21 to ~17 ms
(docs/performance.md, *Fixed*).

`zeros` asks before the memory is first touched, so the kernel can hand out huge
pages at the first write. Where the call does not exist or is refused (another OS,
transparent huge pages off), the cache is ordinary memory; nothing else changes.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
HUGE_PAGE = 2 * 2**20


def zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros, on huge pages where the OS gives them (CPU tensors that span one)."""
    if device.type != "cpu":
        return torch.zeros(*shape, dtype=dtype, device=device)
    tensor = torch.empty(*shape, dtype=dtype)  # not yet touched: no page is mapped
    advise_huge_pages(tensor)
    return tensor.zero_()


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages under the tensor's whole 2 MiB-aligned pages; True if the OS
    took the advice."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if last - first < HUGE_PAGE:
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(first, last - first, MADV_HUGEPAGE) == 0
