"""The memory's weighted value read in plain torch: the reference for every kernel, and the CPU path.

The read (section 3.1 of Lample et al. 2019, summed over heads as in section 3.3) maps, per token n,

    out[n, :] = sum_r weights[n, r] * values[indices[n, r], :]        r over the H*K selected slots

and its backward gives

    grad_values[m, :] = sum over (n, r) with indices[n, r] == m of weights[n, r] * grad_out[n, :]
    grad_weights[n, r] = grad_out[n, :] . values[indices[n, r], :]

Shape legend: N tokens, R = H*K slots read per token, M = n_keys**2 value rows, V = v_dim.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def read_reference(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor) -> Tensor:
    """The definition, written for clarity: gather the R rows of each token, weight, sum.

    Accumulates in fp32 (fp64 when the values are fp64) and returns the values' dtype. Materialises
    the (N, R, V) rows: for tests and small sizes only.
    """
    acc = torch.float64 if values_MV.dtype == torch.float64 else torch.float32
    rows_NRV = values_MV[indices_NR].to(acc)
    out_NV = (rows_NRV * weights_NR.to(acc).unsqueeze(-1)).sum(1)
    return out_NV.to(values_MV.dtype)


def read_backward_reference(
    grad_out_NV: Tensor, values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor
) -> Tuple[Tensor, Tensor]:
    """`(grad_values (M, V) in the values' dtype, grad_weights (N, R) in the weights' dtype)`,
    written out from the formulas above (fp32 accumulation, fp64 for fp64 inputs)."""
    acc = torch.float64 if values_MV.dtype == torch.float64 else torch.float32
    g_NV = grad_out_NV.to(acc)
    contrib_NRV = weights_NR.to(acc).unsqueeze(-1) * g_NV.unsqueeze(1)  # each (n, r)'s share of its row
    grad_values = torch.zeros(values_MV.shape, dtype=acc, device=values_MV.device)
    grad_values.index_add_(0, indices_NR.reshape(-1), contrib_NRV.reshape(-1, values_MV.shape[1]))
    grad_weights = (values_MV[indices_NR].to(acc) * g_NV.unsqueeze(1)).sum(-1)
    return grad_values.to(values_MV.dtype), grad_weights.to(weights_NR.dtype)


def read_torch(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor, sparse_grad: bool = False) -> Tensor:
    """The torch path (CPU, and CUDA without triton): one `embedding_bag` over each token's R slots.

    On CUDA, `embedding_bag`'s backward to `per_sample_weights` is not implemented for bf16 (torch
    2.11; docs/benchmarks.md, "Reference measurements (H100)"), so low-precision tables there take a
    gather + batched matmul instead (which materialises the (N, R, V) rows: fine for a fallback, the
    triton path avoids it).
    `sparse_grad=True` gives the values a sparse COO gradient (one entry per (n, r), uncoalesced).
    Returns `(N, V)` in the values' dtype; the weights are cast to it, as `embedding_bag` requires.
    """
    weights_NR = weights_NR.to(values_MV.dtype)
    if values_MV.dtype == torch.float32 or values_MV.device.type == "cpu":
        return F.embedding_bag(indices_NR, values_MV, per_sample_weights=weights_NR, mode="sum", sparse=sparse_grad)
    return read_gather_matmul(values_MV, indices_NR, weights_NR, sparse_grad=sparse_grad)


def read_gather_matmul(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor, sparse_grad: bool = False) -> Tensor:
    """The read as a gather of the (N, R, V) rows and a batched matmul with the weights (cast to the
    values' dtype): the torch path's fallback where `embedding_bag` has no backward."""
    rows_NRV = F.embedding(indices_NR, values_MV, sparse=sparse_grad)
    weights_N1R = weights_NR.to(values_MV.dtype).unsqueeze(1)
    return torch.bmm(weights_N1R, rows_NRV).squeeze(1)  # (N, 1, R) @ (N, R, V) -> (N, V)
