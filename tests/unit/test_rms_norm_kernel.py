"""The compiled RMSNorm, and RMSNorm of a residual sum, against PyTorch's."""

from __future__ import annotations

import pytest
import torch

from workers.layers.cpu_kernels import load_rms_norm_kernels
from workers.layers.norm import add_rms_norm, rms_norm

pytestmark = pytest.mark.skipif(load_rms_norm_kernels() is None, reason="no C compiler to build the kernel")


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# 2,048 rows take the threaded loop, 3 the single-threaded one; widths with a scalar tail.
@pytest.mark.parametrize("rows,dim", [(2048, 256), (3, 256), (7, 13), (64, 4099)])
def test_kernels_agree_with_pytorch(rows, dim):
    gen = torch.Generator().manual_seed(rows + dim)
    x, delta = torch.randn(rows, dim, generator=gen) * 5, torch.randn(rows, dim, generator=gen)
    weight = torch.rand(dim, generator=gen) + 0.5
    # Only the sum of squares runs in another order: its factor may differ in the last
    # bit, and the two products after it round that: a few ulps at most.
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), reference(x, weight, 1e-5), rtol=4e-7, atol=0)
    total, normed = add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, reference(x + delta, weight, 1e-6), rtol=4e-7, atol=0)


def test_other_dtypes_and_layouts_take_pytorch():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    weight = torch.ones(16, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, weight, 1e-5), weight * (x.float() * torch.rsqrt(
        x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16))
    strided = torch.randn(16, 4).t()  # [4, 16], not contiguous
    torch.testing.assert_close(rms_norm(strided, torch.ones(16), 1e-5), reference(strided, torch.ones(16), 1e-5))
