"""The KV cache's memory is advised onto huge pages (workers/engine/huge_pages.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from workers.engine import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage")
linux = pytest.mark.skipif(not (sys.platform.startswith("linux") and THP.exists()),
                           reason="madvise(MADV_HUGEPAGE) needs Linux with transparent huge pages built in")


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux
def test_a_cache_is_zeros_on_memory_advised_huge():
    cache = huge_pages.zeros((4, 2, 256, 16, 4, 32), torch.float32, torch.device("cpu"))  # 32 MiB
    assert cache.shape == (4, 2, 256, 16, 4, 32) and cache.dtype == torch.float32
    assert torch.count_nonzero(cache) == 0
    # "hg": the mapping carries MADV_HUGEPAGE, whatever pages the kernel found free.
    assert "hg" in vm_flags(cache.data_ptr() + cache.numel() * cache.element_size() // 2)
    plain = torch.zeros(4, 2, 256, 16, 4, 32)
    assert "hg" not in vm_flags(plain.data_ptr() + plain.numel() * plain.element_size() // 2)


def test_a_tensor_smaller_than_a_huge_page_is_left_alone():
    small = torch.empty(1024)  # 4 KiB: no whole 2 MiB page inside
    assert not huge_pages.advise_huge_pages(small)
    assert torch.count_nonzero(huge_pages.zeros((1024,), torch.float32, torch.device("cpu"))) == 0
