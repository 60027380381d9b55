"""Triton kernels for the memory's weighted value read (forward and backward), and their launchers.

Importing this module needs triton; `pkmlm.model.kernels` imports it lazily, only when the triton
path is asked for. The torch formulas these kernels compute, and their reference implementations,
are in `reference.py`; tests run both under `TRITON_INTERPRET=1` on CPU and compare.

Forward: one program per (token, block of V columns) gathers the token's R rows block by block and
accumulates `weight * row` in fp32. The read is bandwidth-bound: R rows of V values per token.

Backward, without atomics and deterministic: the N*R (token, slot) entries are stably sorted by
value row, so each row's entries are a contiguous segment (CSR offsets from a binary search). One
program per row walks its segment once per block of V columns, and in that single pass
  - sums `weight * grad_out[token]` over the segment: the row's gradient, written once (rows
    nobody selected get zeros in the dense layout);
  - dots `grad_out[token]` with the row: each entry's weight gradient (a row belongs to exactly one
    program, so the entry's partial sums over V blocks need no atomics, only a barrier per block).
The value table is read once and its gradient written once; `grad_out` (N x V, tens of MB) is
re-read from cache. Programs take rows in order of decreasing segment length, so a popular row
starts first instead of finishing last.

Shape legend: N tokens, R slots per token (H*K), M value rows (n_keys**2), V value width,
E = N*R entries, U rows touched at least once.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _read_forward_kernel(
    values_ptr,
    indices_ptr,
    weights_ptr,
    out_ptr,
    R,
    V,
    stride_values,
    stride_indices,
    stride_weights,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        rows = tl.load(indices_ptr + token * stride_indices + offs_r, mask=mask_r, other=0).to(tl.int64)
        w = tl.load(weights_ptr + token * stride_weights + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        tile = tl.load(  # (BLOCK_R, BLOCK_V): BLOCK_R gathered row segments
            values_ptr + rows[:, None] * stride_values + offs_v[None, :],
            mask=mask_r[:, None] & mask_v[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(tile * w[:, None], axis=0)
    tl.store(out_ptr + token * stride_out + offs_v, acc.to(out_ptr.dtype.element_ty), mask=mask_v)


@triton.jit
def _read_backward_kernel(
    grad_out_ptr,
    values_ptr,
    weights_ptr,
    order_ptr,
    offsets_ptr,
    prog_rows_ptr,
    prog_dst_ptr,
    grad_values_ptr,
    grad_weights_ptr,
    R,
    V,
    stride_grad_out,
    stride_values,
    stride_grad_values,
    BLOCK_E: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    prog = tl.program_id(0)
    row = tl.load(prog_rows_ptr + prog).to(tl.int64)  # the value row this program owns
    dst = tl.load(prog_dst_ptr + prog).to(tl.int64)  # where its gradient goes in grad_values
    begin = tl.load(offsets_ptr + row).to(tl.int32)  # its segment of the sorted entries
    end = tl.load(offsets_ptr + row + 1).to(tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        value = tl.load(values_ptr + row * stride_values + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for e0 in range(begin, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < end
            entry = tl.load(order_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)  # flat token * R + slot
            token = entry // R
            w = tl.load(weights_ptr + entry, mask=mask_e, other=0.0).to(tl.float32)
            g = tl.load(  # (BLOCK_E, BLOCK_V): grad_out of the tokens that read this row
                grad_out_ptr + token[:, None] * stride_grad_out + offs_v[None, :],
                mask=mask_e[:, None] & mask_v[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(g * w[:, None], axis=0)
            partial = tl.sum(g * value[None, :], axis=1)  # this V block's share of each entry's dot
            previous = tl.load(grad_weights_ptr + entry, mask=mask_e, other=0.0)
            tl.store(grad_weights_ptr + entry, previous + partial, mask=mask_e)
        tl.store(
            grad_values_ptr + dst * stride_grad_values + offs_v,
            acc.to(grad_values_ptr.dtype.element_ty),
            mask=mask_v,
        )
        # The next V block re-reads the weight-gradient partials stored above, possibly in other
        # threads of this program (small vectors are replicated across threads): a block-wide
        # barrier orders those stores before the loads.
        tl.debug_barrier()


# Tile sizes. Untuned on a GPU so far (none was available when this was written): a row segment of
# BLOCK_V values is 1 KB in fp32 and bf16 alike, so each gathered load is a long contiguous burst,
# and a (16, BLOCK_V) tile keeps 16 row reads in flight per program without spilling registers.
BLOCK_ROWS = 16
BLOCK_ENTRIES = 16
ROW_BYTES = 1024
NUM_WARPS = 4


def _block_v(V: int, values: Tensor) -> int:
    return min(triton.next_power_of_2(V), max(ROW_BYTES // values.element_size(), 16))


def _check(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor) -> None:
    if values_MV.dim() != 2 or indices_NR.dim() != 2 or weights_NR.shape != indices_NR.shape:
        raise ValueError(
            f"expected values (M, V), indices (N, R) and weights (N, R); got {tuple(values_MV.shape)}, "
            f"{tuple(indices_NR.shape)}, {tuple(weights_NR.shape)}"
        )
    if values_MV.stride(1) != 1:
        raise ValueError("the value table must have contiguous rows (stride 1 along V)")
    if indices_NR.numel() >= 2**31:
        raise ValueError(f"{indices_NR.numel()} entries: the backward's segment offsets are int32; split the batch")


def read_forward(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor) -> Tensor:
    """`(N, V)` in the values' dtype: `out[n] = sum_r weights[n, r] * values[indices[n, r]]`.

    Slot ids must lie in [0, M) (the lookup's always do); they are not checked, which would cost a
    device-to-host sync per call.
    """
    _check(values_MV, indices_NR, weights_NR)
    indices_NR, weights_NR = indices_NR.contiguous(), weights_NR.contiguous()
    (N, R), V = indices_NR.shape, values_MV.shape[1]
    out_NV = torch.empty((N, V), dtype=values_MV.dtype, device=values_MV.device)
    if N == 0 or V == 0:
        return out_NV
    if R == 0:
        return out_NV.zero_()
    block_v = _block_v(V, values_MV)
    grid = (N, triton.cdiv(V, block_v))
    _read_forward_kernel[grid](
        values_MV,
        indices_NR,
        weights_NR,
        out_NV,
        R,
        V,
        values_MV.stride(0),
        indices_NR.stride(0),
        weights_NR.stride(0),
        out_NV.stride(0),
        BLOCK_R=BLOCK_ROWS,
        BLOCK_V=block_v,
        num_warps=NUM_WARPS,
    )
    return out_NV


def _segments(indices_NR: Tensor, M: int) -> Tuple[Tensor, Tensor]:
    """Entries grouped by row: `order` (E,) flat entry ids, stably sorted by row (so each row's
    entries keep token order and the sums are deterministic), and CSR `offsets` (M + 1,)."""
    flat_E = indices_NR.reshape(-1)
    sorted_rows_E, order_E = torch.sort(flat_E, stable=True)
    offsets = torch.searchsorted(sorted_rows_E, torch.arange(M + 1, device=flat_E.device, dtype=flat_E.dtype))
    return order_E, offsets


def read_backward(
    grad_out_NV: Tensor, values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor, sparse: bool = False
) -> Tuple[Tensor, Tensor]:
    """Gradients of `read_forward`: `(grad_values, grad_weights)`.

    `grad_values` is `(M, V)` in the values' dtype (zero rows where nothing was read), or with
    `sparse=True` a coalesced sparse COO tensor holding only the U touched rows (its row count
    costs one device-to-host sync). `grad_weights` is `(N, R)` in the weights' dtype.
    """
    _check(values_MV, indices_NR, weights_NR)
    indices_NR, weights_NR = indices_NR.contiguous(), weights_NR.contiguous()
    grad_out_NV = grad_out_NV.contiguous()
    (N, R), (M, V) = indices_NR.shape, values_MV.shape
    device = values_MV.device
    grad_weights_NR = torch.zeros((N, R), dtype=torch.float32, device=device)  # accumulated over V blocks
    order_E, offsets = _segments(indices_NR, M)
    counts_M = offsets[1:] - offsets[:-1]
    if sparse:
        touched_U = torch.nonzero(counts_M).squeeze(1)  # ascending: the COO indices, coalesced
        by_length = torch.argsort(counts_M[touched_U], descending=True, stable=True)
        prog_rows, prog_dst = touched_U[by_length], by_length
        grad_rows = torch.empty((touched_U.numel(), V), dtype=values_MV.dtype, device=device)
    else:
        prog_rows = torch.argsort(counts_M, descending=True, stable=True)
        prog_dst = prog_rows
        grad_rows = torch.empty_like(values_MV)
    if prog_rows.numel() and V:
        _read_backward_kernel[(prog_rows.numel(),)](
            grad_out_NV,
            values_MV,
            weights_NR,
            order_E,
            offsets,
            prog_rows,
            prog_dst,
            grad_rows,
            grad_weights_NR,
            R,
            V,
            grad_out_NV.stride(0),
            values_MV.stride(0),
            grad_rows.stride(0),
            BLOCK_E=BLOCK_ENTRIES,
            BLOCK_V=_block_v(V, values_MV),
            num_warps=NUM_WARPS,
        )
    grad_weights_NR = grad_weights_NR.to(weights_NR.dtype)
    if sparse:
        grad_values = torch.sparse_coo_tensor(
            touched_U.unsqueeze(0), grad_rows, (M, V), is_coalesced=True, check_invariants=False
        )
        return grad_values, grad_weights_NR
    return grad_rows, grad_weights_NR


def is_interpreted() -> bool:
    """True when these kernels were built by triton's interpreter (`TRITON_INTERPRET=1` at import):
    they then run on CPU tensors, slowly, for tests."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_read_forward_kernel, InterpretedFunction)
