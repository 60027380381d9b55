"""The sparse sub-key score backward (`model.memory.scores_backward=sparse`, issue 21): the memory's
sub-key scores and product-key search as one autograd Function whose backward touches only the K
winners' sub-keys of each half (`torch.ops.pkmlm_cpu.scores_backward_sparse`, cpu_scores.cpp).

Forward: the layer's own einsum for the scores and the C++ search (`cpu_topk.product_search`), so the
same slots, scores and weights as the default path, bit for bit. Backward: from the K scores' gradient
straight to the query halves and the sub-keys, N * H * 2 * K * P multiply-adds each instead of the two
dense batched matmuls over the (N, H, 2, S) score gradient (S / K = 8x fewer at the knowledge size,
and no dense gradient written). The sums run in another order than the matmuls', so the gradients
agree to rounding, not bit for bit (tests/unit/test_cpu_scores.py): hence opt-in (the golden run keeps
`dense`). Built into the same library as the C++ top-k (`cpu_topk.load()`).

Shape legend as in memory.py: N tokens, H heads, P half of a query, S sub-keys per half, K knn, C rank pairs.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from pkmlm.model.kernels import cpu_topk

# The query / sub-key dtypes the sparse backward takes (the retrieval runs in fp32 by default; fp64 for tests).
DTYPES = (torch.float32, torch.float64)


def scores(q_NH2P: Tensor, keys_H2SP: Tensor) -> Tensor:
    """`(N, H, 2, S)`: every sub-key's score, one batched matmul of 2H (N, P) x (P, S) products (the
    layer's own call, `ProductKeyMemory._lookup`: the same bits on either path)."""
    return torch.einsum("nhcp,hcsp->nhcs", q_NH2P, keys_H2SP)


class _SparseSearch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_NH2P: Tensor, keys_H2SP: Tensor, pair_a_C: Tensor, pair_b_C: Tensor, k: int):
        s_NH2S = scores(q_NH2P, keys_H2SP)
        scores_NHK, slot_NHK, i_NHK, j_NHK = cpu_topk.product_search(s_NH2S, pair_a_C, pair_b_C, k)
        ctx.mark_non_differentiable(slot_NHK, i_NHK, j_NHK)
        ctx.set_materialize_grads(False)  # no zero tensors made for the integer outputs' gradients
        ctx.save_for_backward(q_NH2P, keys_H2SP, slot_NHK)  # the winners' sub-keys: slot // S, slot % S
        return scores_NHK, slot_NHK, i_NHK, j_NHK

    @staticmethod
    def backward(ctx, grad_scores_NHK: Tensor, *grad_rest):
        q_NH2P, keys_H2SP, slot_NHK = ctx.saved_tensors
        if grad_scores_NHK is None:
            return None, None, None, None, None
        grad_q_NH2P, grad_keys_H2SP = torch.ops.pkmlm_cpu.scores_backward_sparse(
            grad_scores_NHK.contiguous(), slot_NHK, q_NH2P, keys_H2SP
        )
        return grad_q_NH2P, grad_keys_H2SP, None, None, None


def search(
    q_NH2P: Tensor, keys_H2SP: Tensor, pair_a_C: Tensor, pair_b_C: Tensor, k: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(scores (N, H, K) fp32, slot ids, each half's top-k sub-key ids i, j (N, H, K))` of the exact
    top-k over product keys, as `kernels.product_search(scores(q, keys), ...)` gives them, with the
    sparse backward to `q` and `keys` (the library must be loaded, CPU tensors of one of `DTYPES`;
    `kernels.sparse_search` checks)."""
    return _SparseSearch.apply(q_NH2P, keys_H2SP, pair_a_C, pair_b_C, k)
