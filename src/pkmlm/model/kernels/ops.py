"""The triton read as a PyTorch operator: `torch.ops.pkmlm.memory_read`, with autograd.

Registered with `torch.library.custom_op`, so `torch.compile` keeps it as one opaque node (its
fake implementation gives the output's shape) instead of tracing into triton launches, and the
rest of the model compiles around it. The kernels module is imported inside the implementations,
so registering the operator needs torch only.

Sparse value gradients (`optim.sparse_values`) go through `SparseGradRead`, a plain autograd
Function: custom operators must return dense tensors of a shape known in advance, and a coalesced
sparse gradient's row count is only known after the backward has counted the touched rows.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


@torch.library.custom_op("pkmlm::memory_read", mutates_args=())
def memory_read(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """`(N, V)`: `out[n] = sum_r weights[n, r] * values[indices[n, r]]` (triton)."""
    from pkmlm.model.kernels import gather

    return gather.read_forward(values, indices, weights)


@memory_read.register_fake
def _memory_read_fake(values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    return values.new_empty((indices.shape[0], values.shape[1]))


@torch.library.custom_op("pkmlm::memory_read_backward", mutates_args=())
def memory_read_backward(grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor]:
    """`(grad_values (M, V), grad_weights (N, R))` of `memory_read` (triton, dense, deterministic)."""
    from pkmlm.model.kernels import gather

    return gather.read_backward(grad_out, values, indices, weights)


@memory_read_backward.register_fake
def _memory_read_backward_fake(grad_out: Tensor, values: Tensor, indices: Tensor, weights: Tensor):
    return torch.empty_like(values), torch.empty_like(weights)


def _setup_context(ctx, inputs, output) -> None:
    values, indices, weights = inputs
    ctx.save_for_backward(values, indices, weights)


def _backward(ctx, grad_out: Tensor):
    values, indices, weights = ctx.saved_tensors
    grad_values, grad_weights = memory_read_backward(grad_out, values, indices, weights)
    return grad_values, None, grad_weights


memory_read.register_autograd(_backward, setup_context=_setup_context)


class SparseGradRead(torch.autograd.Function):
    """The triton read whose value gradient is a coalesced sparse COO tensor of the touched rows."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        from pkmlm.model.kernels import gather

        ctx.save_for_backward(values, indices, weights)
        return gather.read_forward(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        from pkmlm.model.kernels import gather

        values, indices, weights = ctx.saved_tensors
        grad_values, grad_weights = gather.read_backward(grad_out, values, indices, weights, sparse=True)
        return grad_values, None, grad_weights
