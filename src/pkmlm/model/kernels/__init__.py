"""Fast paths for the product-key memory, each with a torch reference beside it.

`read(values, indices, weights, kernel=...)` is the memory's weighted value read
`out[n] = sum_r weights[n, r] * values[indices[n, r]]` by one of two paths:

- `torch`: `embedding_bag` (`reference.read_torch`), the reference and the CPU path;
- `triton`: the kernels of `gather.py` behind the operator `torch.ops.pkmlm.memory_read`
  (`ops.py`): one bandwidth-bound pass forward, one sort and one atomic-free pass backward.

`dot(table, indices, x)` is PEER's per-slot dot product `h[n, r] = x[n] . table[indices[n, r]]`
(the down vectors of its single-neuron experts), a gather and a batched matmul on the torch path
for every device (it materialises the (N, R, D) rows; no triton kernel yet).

`topk(x, k, impl=...)` is `torch.topk(x, k, dim=-1)` (largest, sorted), by the C++ CPU kernel of
`cpu_topk.py` on CPU tensors when `impl` is `cpp` (`model.memory.topk_impl`: `auto` takes it where it
builds), by torch otherwise: the same values, indices and gradients, bit for bit.

`product_search(s, ...)` is the whole search the memory layer makes of its sub-key scores (both
halves' top-k, then the top-k of the candidate sums): the top-k scores (fp32), slot ids and both
halves' sub-key ids; on CPU with `cpp` one C++ pass for the forward and one for the backward (no
dense zero fill, no gathers), bit for bit the torch ops.
`sparse_search(q, keys, ...)` (`model.memory.scores_backward=sparse`, opt-in) computes the sub-key
scores too, with a backward over the K winners' sub-keys only (cpu_scores.py; equal to rounding).

`read(..., read_impl="cpp")` (`model.memory.read_impl`, opt-in) takes the fused CPU read of
`cpu_read.py` for CPU tables on the torch path: `embedding_bag`'s output, a one-pass C++ backward
(gradients equal to rounding, not bit for bit: hence not the default).

`model.memory.kernel=auto` takes triton on CUDA when triton is installed, torch otherwise. The triton
kernels also run on CPU tensors under `TRITON_INTERPRET=1` (how the tests check them without a GPU).
Everything here imports with torch alone (neither triton nor torch._dynamo); triton is imported
when its kernels first run.
"""

from __future__ import annotations

import importlib.util
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pkmlm.errors import ConfigError, require_one_of
from pkmlm.model.kernels import (
    cpu_read,
    cpu_scores,
    cpu_topk,
    ops,
)  # ops registers torch.ops.pkmlm.memory_read (torch only)
from pkmlm.model.kernels.reference import read_torch

Kernel = Literal["auto", "torch", "triton"]
# The top-k of the memory's retrieval on CPU tensors: auto (the C++ kernel where it builds, else
# torch.topk) | torch | cpp (refused where it cannot be built). CUDA tensors always take torch.topk.
TopkImpl = Literal["auto", "torch", "cpp"]
# The read's backward on CPU tables: torch (embedding_bag's, the default: the golden run's bits) |
# cpp (the fused C++ backward of cpu_read.py; refused where it cannot be built).
ReadImpl = Literal["torch", "cpp"]
# The sub-key scores' backward on CPU: dense (the (N, H, 2, S) score gradient and two batched matmuls:
# the golden run's bits, every device) | sparse (cpu_scores.py: the K winners' sub-keys only; refused
# where the C++ library cannot be built).
ScoresBackward = Literal["dense", "sparse"]


# Both answers are cached in plain globals, found once when a memory layer is built (by
# `check_kernel`): under torch.compile the traced forward then only reads them, and `import pkmlm`
# imports neither triton nor torch._dynamo.
_triton_available: Optional[bool] = None
_triton_interpreted: Optional[bool] = None


def triton_available() -> bool:
    """Whether triton is installed (a CPU-only torch may have it too, for the interpreter). Found on
    the import path without importing it; the kernels import it when they first run."""
    global _triton_available
    if _triton_available is None:
        _triton_available = importlib.util.find_spec("triton") is not None
    return _triton_available


def triton_interpreted() -> bool:
    """Whether the triton kernels run under the interpreter (`TRITON_INTERPRET=1` when first imported)."""
    global _triton_interpreted
    if _triton_interpreted is None:
        from pkmlm.model.kernels import gather

        _triton_interpreted = gather.is_interpreted()
    return _triton_interpreted


def check_kernel(kernel: str, key: str = "model.memory.kernel") -> None:
    """Raise `ConfigError` for an unknown kernel, or `triton` where triton cannot be imported."""
    require_one_of(key, kernel, Kernel)
    if not triton_available():
        if kernel == "triton":
            raise ConfigError(key, kernel, "needs the triton package (pip install triton); or use auto or torch")
    elif kernel == "triton" and not torch.cuda.is_available():
        triton_interpreted()  # imports the kernels now (explicitly asked for), not in a traced forward


def resolve_kernels(kernel: str) -> Tuple[str, Optional[str]]:
    """`(path on CUDA, path on any other device)` for a configured `kernel`, resolved once (when a
    memory layer is built, before it knows where it will run). `auto`: triton on CUDA when triton
    is installed, torch elsewhere. An explicit `triton` off CUDA runs only under the interpreter;
    otherwise the second path is None and `resolve_kernel` gives the refusal. `kernel` was checked at
    the config boundary (`check_kernel`)."""
    if kernel == "auto":
        return ("triton" if triton_available() else "torch"), "torch"
    if kernel == "torch":
        return "torch", "torch"
    return "triton", ("triton" if triton_interpreted() else None)


def resolve_kernel(kernel: str, device: torch.device, key: str = "model.memory.kernel") -> str:
    """The path a read on `device` takes: `torch` or `triton`.

    `auto` is triton on CUDA when triton is installed, else torch. An explicit `triton` on a non-CUDA
    device works only under the interpreter; otherwise it is refused with a `ConfigError`. `kernel`
    was checked at the config boundary (`check_kernel`).
    """
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if kernel == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ConfigError(
            key,
            kernel,
            f"the triton kernels need a CUDA device (got {device.type}); use auto or torch, or set "
            "TRITON_INTERPRET=1 to run them (slowly) through triton's interpreter",
        )
    return kernel


def check_topk_impl(impl: str, key: str = "model.memory.topk_impl") -> None:
    """Raise `ConfigError` for an unknown `impl`, or `cpp` where the C++ kernel cannot be built."""
    require_one_of(key, impl, TopkImpl)
    if impl == "cpp" and not cpu_topk.load():
        raise ConfigError(
            key, impl, f"the C++ CPU top-k could not be built ({cpu_topk.unavailable_reason()}); use auto or torch"
        )


def resolve_topk(impl: str) -> str:
    """The top-k path of CPU tensors for a checked `impl` (`check_topk_impl`, at the config
    boundary), resolved once (when a memory layer is built): `cpp` or `torch`. `auto` builds (first
    time on a machine) or loads the C++ kernel and takes it where that works;
    `cpu_topk.unavailable_reason()` then says why not."""
    if impl == "torch":
        return "torch"
    return "cpp" if cpu_topk.load() else "torch"


def check_read_impl(impl: str, key: str = "model.memory.read_impl") -> None:
    """Raise `ConfigError` for an unknown `impl`, or `cpp` where the C++ library cannot be built."""
    require_one_of(key, impl, ReadImpl)
    if impl == "cpp" and not cpu_read.load():
        raise ConfigError(
            key, impl, f"the C++ CPU read could not be built ({cpu_topk.unavailable_reason()}); use torch"
        )


def check_scores_backward(value: str, key: str = "model.memory.scores_backward") -> None:
    """Raise `ConfigError` for an unknown value, or `sparse` where the C++ library cannot be built."""
    require_one_of(key, value, ScoresBackward)
    if value == "sparse" and not cpu_topk.load():
        raise ConfigError(
            key, value, f"the C++ CPU library could not be built ({cpu_topk.unavailable_reason()}); use dense"
        )


def topk(x: Tensor, k: int, impl: str) -> Tuple[Tensor, Tensor]:
    """`torch.topk(x, k, dim=-1)` (largest, sorted): by the C++ kernel for a CPU tensor of its dtypes
    when `impl` is the resolved `cpp`, by torch otherwise (CUDA, other dtypes, k out of range)."""
    if (
        impl == "cpp"
        and x.device.type == "cpu"
        and x.dtype in cpu_topk.DTYPES
        and x.dim() >= 1
        and 0 < k <= x.shape[-1]
    ):
        return cpu_topk.topk(x, k)
    return torch.topk(x, k, dim=-1)


def product_search(
    s_N2S: Tensor, pair_a_C: Tensor, pair_b_C: Tensor, k: int, impl: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The memory's search of its sub-key scores `s` `(..., 2, S)`: `(scores (..., k) fp32, slot ids,
    i, j (..., k) int64)`, the k best sums `float(top0[a]) + float(top1[b])` over the eligible rank
    pairs in descending order, their slot ids `ids0[a] * S + ids1[b]`, and each half's top-k sub-key
    ids `ids0`, `ids1` (what UltraMemV2's balance loss counts); only `scores`
    carries a gradient (to `s`). On CPU with the resolved `cpp` one C++ pass forward and backward
    (`cpu_topk.product_search`), bit for bit the torch ops below, which every other device runs."""
    if impl == "cpp" and s_N2S.device.type == "cpu" and s_N2S.dtype in cpu_topk.DTYPES and s_N2S.dim() >= 2:
        return cpu_topk.product_search(s_N2S, pair_a_C, pair_b_C, k)
    # Best k sub-keys of each half (sorted), both halves in one torch.topk; then the candidate sums
    # top1[a] + top2[b] in fp32 over the eligible rank pairs, and their top-k: the winners' ranks
    # (a, b) in the two half lists. The ranking needs no gradient; the winners' sums are re-added.
    top_N2K, ids_N2K = torch.topk(s_N2S, k, dim=-1)
    with torch.no_grad():
        # index_select rather than advanced indexing: the same values, a cheaper op on CPU.
        cand_NC = top_N2K[..., 0, :].float().index_select(-1, pair_a_C) + top_N2K[..., 1, :].float().index_select(
            -1, pair_b_C
        )
        best_NK = cand_NC.topk(k, dim=-1).indices  # sorted by descending score
    a_NK, b_NK = pair_a_C[best_NK], pair_b_C[best_NK]
    top1_NK, top2_NK = top_N2K[..., 0, :].float(), top_N2K[..., 1, :].float()
    i_NK, j_NK = ids_N2K[..., 0, :], ids_N2K[..., 1, :]
    scores_NK = top1_NK.gather(-1, a_NK) + top2_NK.gather(-1, b_NK)
    # Map the ranks back to the sub-key ids of the two halves, then to the slot id.
    slot_NK = i_NK.gather(-1, a_NK) * s_N2S.shape[-1] + j_NK.gather(-1, b_NK)
    return scores_NK, slot_NK, i_NK, j_NK


def sparse_search(
    q_NH2P: Tensor, keys_H2SP: Tensor, pair_a_C: Tensor, pair_b_C: Tensor, k: int
) -> Optional[Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """`product_search(cpu_scores.scores(q, keys), ...)`'s outputs with the sparse backward to `q` and
    `keys` (`cpu_scores.py`), or None where it does not apply (not CPU, dtypes other than
    `cpu_scores.DTYPES`, the library not loaded): the caller then takes the dense path."""
    if (
        q_NH2P.device.type == "cpu"
        and keys_H2SP.device.type == "cpu"
        and q_NH2P.dtype == keys_H2SP.dtype
        and q_NH2P.dtype in cpu_scores.DTYPES
        and cpu_topk.load()
    ):
        return cpu_scores.search(q_NH2P, keys_H2SP, pair_a_C, pair_b_C, k)
    return None


def read(
    values_MV: Tensor,
    indices_NR: Tensor,
    weights_NR: Tensor,
    *,
    kernel: str,
    sparse_grad: bool = False,
    read_impl: str = "torch",
) -> Tensor:
    """`(N, V)` in the values' dtype: the weighted read by the resolved `kernel` (`torch|triton`).

    `sparse_grad=True` gives the table a sparse COO gradient (for `optim.sparse_values`; the torch
    backward then, whatever `read_impl`). `read_impl="cpp"` (checked by `check_read_impl`): the fused
    C++ backward for a CPU table of `cpu_read.DTYPES` on the torch path.
    """
    if kernel not in ("torch", "triton"):
        raise ValueError(f"read(): kernel must be resolved to torch or triton, got {kernel!r}")
    if sparse_grad:
        if torch.compiler.is_compiling():
            # Compiled graphs cannot produce sparse gradients (inductor fails on them), so under
            # torch.compile this read runs eagerly between two compiled pieces (a graph break).
            return torch.compiler.disable(_read_sparse_grad)(values_MV, indices_NR, weights_NR, kernel)
        return _read_sparse_grad(values_MV, indices_NR, weights_NR, kernel)
    if kernel == "torch":
        if read_impl == "cpp" and values_MV.device.type == "cpu" and values_MV.dtype in cpu_read.DTYPES:
            return cpu_read.read(values_MV, indices_NR, weights_NR)
        return read_torch(values_MV, indices_NR, weights_NR)
    # fp32 weights: their gradient accumulates in fp32 whatever the table's dtype
    return ops.memory_read(values_MV, indices_NR, weights_NR.float())


def dot(table_MD: Tensor, indices_NR: Tensor, x_ND: Tensor, *, sparse_grad: bool = False) -> Tensor:
    """`(N, R)` fp32: `x[n] . table[indices[n, r]]` (PEER's `x . u_i`), in the table's dtype with
    fp32 output. `sparse_grad=True` gives the table a sparse COO gradient (uncoalesced)."""
    if sparse_grad and torch.compiler.is_compiling():
        return torch.compiler.disable(_dot)(table_MD, indices_NR, x_ND, True)  # as `read`: a graph break
    return _dot(table_MD, indices_NR, x_ND, sparse_grad)


def _dot(table_MD: Tensor, indices_NR: Tensor, x_ND: Tensor, sparse_grad: bool) -> Tensor:
    rows_NRD = F.embedding(indices_NR, table_MD, sparse=sparse_grad)
    x_ND1 = x_ND.to(rows_NRD.dtype).unsqueeze(-1)
    return torch.bmm(rows_NRD, x_ND1).squeeze(-1).float()  # (N, R, D) @ (N, D, 1) -> (N, R)


def _read_sparse_grad(values_MV: Tensor, indices_NR: Tensor, weights_NR: Tensor, kernel: str) -> Tensor:
    if kernel == "torch":
        return read_torch(values_MV, indices_NR, weights_NR, sparse_grad=True)
    return ops.SparseGradRead.apply(values_MV, indices_NR, weights_NR.float())


__all__ = [
    "Kernel",
    "TopkImpl",
    "ReadImpl",
    "ScoresBackward",
    "check_read_impl",
    "check_scores_backward",
    "product_search",
    "sparse_search",
    "check_topk_impl",
    "resolve_topk",
    "topk",
    "check_kernel",
    "dot",
    "read",
    "resolve_kernel",
    "resolve_kernels",
    "triton_available",
    "triton_interpreted",
]
