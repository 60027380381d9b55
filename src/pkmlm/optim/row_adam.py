"""Triton kernel for the lazy (row-sparse) Adam step of a memory value table: one pass per touched row.

For each of the U rows a sparse gradient holds, one program reads the row's gradient, value and
two moments once and writes the value and moments once (7 row transfers), where a sequence of torch
ops on gathered rows moves each row a dozen times or more. The arithmetic is torch.optim.AdamW's
(see `pkmlm.optim.lazy_adam.LazyAdam`, whose torch path is the reference), in fp32 registers
whatever the storage dtype. Importing this module needs triton.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _row_adam_kernel(
    param_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    grad_ptr,
    rows_ptr,
    V,
    stride_param,
    stride_grad,
    beta1,
    beta2,
    eps,
    decay_factor,
    step_size,
    bias_correction2_sqrt,
    BLOCK_V: tl.constexpr,
):
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u).to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask = offs_v < V
        at_row = row * stride_param + offs_v  # param and both moments share one layout
        g = tl.load(grad_ptr + u * stride_grad + offs_v, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(param_ptr + at_row, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(exp_avg_ptr + at_row, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(exp_avg_sq_ptr + at_row, mask=mask, other=0.0).to(tl.float32)
        p = p * decay_factor  # decoupled weight decay, 1 - lr * weight_decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(param_ptr + at_row, p.to(param_ptr.dtype.element_ty), mask=mask)
        tl.store(exp_avg_ptr + at_row, m.to(exp_avg_ptr.dtype.element_ty), mask=mask)
        tl.store(exp_avg_sq_ptr + at_row, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=mask)


def row_adam_step(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    rows_U: Tensor,
    grad_UV: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    decay_factor: float,
    step_size: float,
    bias_correction2_sqrt: float,
) -> None:
    """In place: the Adam update of `param[rows_U]` and its moments from `grad_UV` (rows distinct)."""
    if param.stride() != exp_avg.stride() or param.stride() != exp_avg_sq.stride() or param.stride(1) != 1:
        raise ValueError("param and its moments must share one row-contiguous layout")
    U, V = grad_UV.shape
    if U == 0 or V == 0:
        return
    grad_UV = grad_UV.contiguous()
    block_v = min(triton.next_power_of_2(V), 1024)
    _row_adam_kernel[(U,)](
        param,
        exp_avg,
        exp_avg_sq,
        grad_UV,
        rows_U.contiguous(),
        V,
        param.stride(0),
        grad_UV.stride(0),
        beta1,
        beta2,
        eps,
        decay_factor,
        step_size,
        bias_correction2_sqrt,
        BLOCK_V=block_v,
        num_warps=4,
    )
