"""The compiled silu(gate) * up against PyTorch's, which it replaces in float32 on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.layers.activation import silu_mul
from workers.layers.cpu_kernels import load_swiglu_kernel

pytestmark = pytest.mark.skipif(load_swiglu_kernel() is None, reason="no C compiler to build the kernel")


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return F.silu(gate) * up


# 2,048 rows take the threaded loop, 3 the single-threaded one; widths with a scalar
# tail (13, 771) and without; gates from -120 to 120, past where e^x underflows.
@pytest.mark.parametrize("rows,width", [(2048, 768), (3, 768), (5, 13), (64, 771)])
def test_kernel_agrees_with_pytorch_to_a_few_ulps(rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    gate_up = torch.randn(rows, 2 * width, generator=gen) * 8
    gate_up[0, :width] = torch.linspace(-120, 120, width)
    got = silu_mul(gate_up)
    want = reference(gate_up)
    assert got.shape == (rows, width) and got.dtype == torch.float32
    # A few ulps of the exact value. Past gate -87, where e^gate leaves float's normal
    # range (silu(-120) is 1e-50), values under 1e-30 may come out as zero.
    ulp = torch.finfo(torch.float32).eps
    assert torch.all((got.double() - want).abs() <= 4 * ulp * want.abs() + 1e-30)
    torch.testing.assert_close(got, F.silu(gate_up[:, :width]) * gate_up[:, width:], rtol=5e-7, atol=1e-30)


def test_rows_of_a_wider_buffer_are_read_at_their_stride():
    wide = torch.randn(7, 40, generator=torch.Generator().manual_seed(2))
    gate_up = wide[:, :32]  # rows 40 apart, as a view of a larger projection
    assert torch.equal(silu_mul(gate_up), silu_mul(gate_up.contiguous()))


def test_other_dtypes_take_pytorch():
    gate_up = torch.randn(4, 16, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_mul(gate_up), F.silu(gate) * up)
