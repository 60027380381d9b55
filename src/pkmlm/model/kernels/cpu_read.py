"""The fused CPU read (`model.memory.read_impl=cpp`, issue 21): the memory's weighted value read with
`embedding_bag`'s forward (the same call as `reference.read_torch`, so the same output bits) and a
C++ backward (`torch.ops.pkmlm_cpu.read_backward`, cpu_read.cpp) that computes the value table's
dense gradient and the weights' gradient in one pass over the reads, rows split over torch's threads.

Not bit for bit `embedding_bag`'s backward: each value-gradient row is summed in read order and each
weight gradient is a plain dot (ATen sums by axpy calls in its sort's order and by BLAS dots), so the
gradients agree to rounding (tests/unit/test_cpu_read.py) and the option is opt-in (the golden run
keeps `torch`). Built into the same library as the C++ top-k (`cpu_topk.load()`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pkmlm.model.kernels import cpu_topk

# The value dtypes the read supports: the memory's `VALUES_DTYPES` (fp32, bf16) and fp64 for tests.
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def load() -> bool:
    """Build or load the C++ library (shared with the top-k); False where it cannot be."""
    return cpu_topk.load()


class _FusedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor) -> Tensor:
        ctx.save_for_backward(values_MV, indices_NR, weights_NR)
        return F.embedding_bag(indices_NR, values_MV, per_sample_weights=weights_NR, mode="sum")

    @staticmethod
    def backward(ctx, grad_out_NV: Tensor):
        values_MV, indices_NR, weights_NR = ctx.saved_tensors
        grad_values_MV, grad_weights_NR = torch.ops.pkmlm_cpu.read_backward(
            grad_out_NV.to(values_MV.dtype), values_MV, indices_NR, weights_NR
        )
        return grad_values_MV, None, grad_weights_NR


def read(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor) -> Tensor:
    """`(N, V)` in the values' dtype: `reference.read_torch`'s output, with the fused backward (the
    library must be loaded and the tensors on the CPU, values of one of `DTYPES`; `kernels.read`
    checks and falls back). The weights are cast to the values' dtype, as `embedding_bag` requires."""
    return _FusedRead.apply(values_MV, indices_NR, weights_NR.to(values_MV.dtype))
