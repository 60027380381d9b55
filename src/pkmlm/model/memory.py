"""Product-key memory (Lample et al., NeurIPS 2019, "Large Memory Layers with Product Keys").

A memory layer maps a token's hidden state to a weighted sum of a few rows of a huge value table
(n_keys**2 rows), chosen by an exact k-nearest-neighbour search that costs O(n_keys) instead of
O(n_keys**2) thanks to product keys. The file follows the paper:

  section 3.1  query network            x -> q                    `ProductKeyMemory.query`
  section 3.2  product keys, exact knn  q -> (weights, slot ids)  `ProductKeyMemory.lookup`
  section 3.1  weighted value read      -> sum_k w_k * value[id_k]`ProductKeyMemory.forward`
  section 3.3  multi-head memory        every step above runs for H independent heads, whose
                                        reads are summed

Reference implementation: facebookresearch/XLM `xlm/model/memory/memory.py` (HashingMemory with
the "pq_fast" product-quantised lookup). Differences on purpose: no class-level shared value table
(each instance owns its values, or reads a table handed to it by an explicit owner: the
Transformer's, for `share_values`), and evaluation statistics go through an `observer` callback that
receives device tensors instead of copying indices to the host on every step.

Shape legend (suffixes on tensor names):
  N  tokens (all leading dimensions of the input flattened)
  D  model dim (input of the memory)
  H  memory heads
  Q  k_dim, the query / key dimension of one head
  P  Q // 2, one half of a query or a sub-key (the "product" halves)
  S  n_keys, sub-keys per half (the value table has S*S slots)
  K  knn, slots read per head
  C  K*K candidate pairs per head
  V  v_dim, the value dimension
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.errors import ConfigError
from pkmlm.model import kernels

QUERY_NORMS = ("batchnorm", "layernorm", "none")
PLACEMENTS = ("replace", "parallel")
# Storage dtype of the value table. bfloat16 halves the bytes every read and update moves; the
# table's AdamW moments then are bfloat16 too (updates below half a bf16 step of a value are lost).
VALUES_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MemoryConfig:
    """Where the memory layers go and their hyper-parameters (defaults: the paper's main setting)."""

    layers: List[int] = field(default_factory=list)  # 0-based transformer layer indices, [] = dense
    # replace (the paper: memory instead of the FFN) | parallel (FFN + memory, summed)
    placement: str = "replace"
    n_keys: int = 512  # sub-keys per half -> n_keys**2 value slots (512**2 = 262k, the paper's size)
    heads: int = 4
    knn: int = 32
    k_dim: int = 512
    v_dim: Optional[int] = None  # None = model dim
    query_norm: str = "batchnorm"  # batchnorm | layernorm | none
    input_dropout: float = 0.0  # XLM's memory dropouts
    query_dropout: float = 0.0
    value_dropout: float = 0.0
    kernel: str = "auto"  # auto (triton on CUDA when installed, else torch) | torch | triton
    values_dtype: str = "float32"  # float32 | bfloat16: storage of the value table
    # One value table read by every memory layer, owned by the Transformer (PEER/"shared memory"
    # style: more layers query the same n_keys**2 values; each layer keeps its own query and keys).
    share_values: bool = False
    # Split each value table by columns across the processes of a distributed run (layout and
    # communication cost: pkmlm/model/sharded_values.py). Ignored with one process.
    shard_values: bool = False

    def validate(self, prefix: str = "model.memory", n_layers: Optional[int] = None) -> None:
        """Raise `ConfigError` on the first bad value; `n_layers` bounds the layer indices."""
        if n_layers is not None:
            layers = list(self.layers)
            for index in layers:
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_layers:
                    raise ConfigError(
                        f"{prefix}.layers",
                        layers,
                        f"each index must be in [0, {n_layers - 1}] for model.n_layers={n_layers}",
                    )
            if len(set(layers)) != len(layers):
                raise ConfigError(f"{prefix}.layers", layers, "indices must be distinct (no duplicates)")
        for name in ("share_values", "shard_values"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), "true or false")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"{prefix}.placement", self.placement, f"one of {'|'.join(PLACEMENTS)}")
        check_memory_args(prefix, **_layer_args(self))


def _layer_args(cfg: MemoryConfig) -> dict:
    """The fields of `cfg` that are `ProductKeyMemory` arguments (the rest place the layers)."""
    names = ("n_keys", "heads", "knn", "k_dim", "v_dim", "query_norm", "input_dropout", "query_dropout",
             "value_dropout", "kernel", "values_dtype")
    return {name: getattr(cfg, name) for name in names}


def check_memory_args(
    prefix: str,
    *,
    n_keys: int,
    heads: int,
    knn: int,
    k_dim: int,
    v_dim: Optional[int],
    query_norm: str,
    input_dropout: float,
    query_dropout: float,
    value_dropout: float,
    kernel: str,
    values_dtype: str = "float32",
) -> None:
    """The memory's own argument checks, shared by `MemoryConfig` and `ProductKeyMemory`."""

    def positive_int(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{prefix}.{name}", value, "a positive integer")

    positive_int("n_keys", n_keys)
    positive_int("heads", heads)
    if isinstance(knn, bool) or not isinstance(knn, int) or not 1 <= knn <= n_keys:
        raise ConfigError(f"{prefix}.knn", knn, f"an integer in [1, {n_keys}] ({prefix}.n_keys={n_keys})")
    if isinstance(k_dim, bool) or not isinstance(k_dim, int) or k_dim < 2 or k_dim % 2:
        raise ConfigError(f"{prefix}.k_dim", k_dim, "an even integer >= 2 (a query splits into two halves)")
    if v_dim is not None:
        positive_int("v_dim", v_dim)
    if query_norm not in QUERY_NORMS:
        raise ConfigError(f"{prefix}.query_norm", query_norm, f"one of {'|'.join(QUERY_NORMS)}")
    dropouts = {"input_dropout": input_dropout, "query_dropout": query_dropout, "value_dropout": value_dropout}
    for name, p in dropouts.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ConfigError(f"{prefix}.{name}", p, "a probability in [0, 1)")
    kernels.check_kernel(kernel, f"{prefix}.kernel")  # also refuses triton where it does not import
    if values_dtype not in VALUES_DTYPES:
        raise ConfigError(f"{prefix}.values_dtype", values_dtype, f"one of {'|'.join(VALUES_DTYPES)}")


def eligible_rank_pairs(knn: int) -> Tuple[Tensor, Tensor]:
    """Rank pairs `(a, b)` (0-based, row-major) with `(a + 1) * (b + 1) <= knn`: int64 `(C,)` each.

    With both per-half top-K lists sorted by descending score, the pairs (a', b') with a' <= a and
    b' <= b all score at least as high as (a, b): (a + 1) * (b + 1) of them, itself included. So a
    pair beyond the bound has K others at least as good and is never needed: the pairs of score
    >= the K-th best form a set closed under that dominance, and any such set of at least K pairs
    holds one of exactly K, all within the bound. With ties at the K-th score, which of the tied
    slots are chosen may differ from a search over all K*K pairs; the K scores never do.
    C = sum over a of floor(K / (a + 1)) ~ K (ln K + 0.58): 130 pairs instead of 1,024 for K = 32.
    """
    pairs = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
    pair_a_C = torch.tensor([a for a, _ in pairs], dtype=torch.int64)
    pair_b_C = torch.tensor([b for _, b in pairs], dtype=torch.int64)
    return pair_a_C, pair_b_C


class ProductKeyMemory(nn.Module):
    """A multi-head product-key memory layer: `(..., dim)` -> `(..., v_dim)`.

    Query norm and causality: `query_norm="batchnorm"` (the paper and XLM) normalises each query
    feature with statistics over all tokens of the batch in training mode, so every token's query
    depends on the other tokens of the batch, future ones included: a BatchNorm memory is causal
    only in eval mode (running statistics). `"layernorm"` normalises each head's query per token
    and is causal in both modes; `"none"` uses the raw projection.

    Evaluation statistics: set `observer` to a callable; every forward then calls
    `observer(indices_NHK, weights_NHK)` with detached device tensors (N = flattened leading dims).
    Nothing is ever copied to the host here.
    """

    def __init__(
        self,
        dim: int,
        n_keys: int = 512,
        heads: int = 4,
        knn: int = 32,
        k_dim: int = 512,
        v_dim: Optional[int] = None,
        query_norm: str = "batchnorm",
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        kernel: str = "auto",
        values_dtype: str = "float32",
        values: Optional[nn.Module] = None,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError("model.dim", dim, "a positive integer")
        check_memory_args(
            "model.memory",
            n_keys=n_keys,
            heads=heads,
            knn=knn,
            k_dim=k_dim,
            v_dim=v_dim,
            query_norm=query_norm,
            input_dropout=input_dropout,
            query_dropout=query_dropout,
            value_dropout=value_dropout,
            kernel=kernel,
            values_dtype=values_dtype,
        )
        self.dim, self.n_keys, self.heads, self.knn, self.k_dim = dim, n_keys, heads, knn, k_dim
        self.v_dim = dim if v_dim is None else v_dim
        self.query_norm = query_norm
        self.input_dropout = input_dropout  # XLM's three memory dropouts (see `query` and `forward`)
        self.query_dropout = query_dropout
        self.value_dropout = value_dropout
        # The read's path, resolved per call from the device: `kernels.resolve_kernel`.
        self.kernel = kernel
        # Sparse COO gradients for the value table (set by the optimizer for optim.sparse_values).
        self.sparse_grad = False

        # Section 3.1, query network: a linear map to H queries of Q dims (XLM's QueryMLP with
        # mem_query_layer_sizes "0,0": one layer, with bias), then the query norm.
        self.query_proj = nn.Linear(dim, heads * k_dim)
        if query_norm == "batchnorm":
            # The paper's choice: batch norm on the query, which its ablations find improves key usage.
            self.query_norm_layer: Optional[nn.Module] = nn.BatchNorm1d(heads * k_dim)
        elif query_norm == "layernorm":
            # Per-token LayerNorm over each head's Q features with a per-feature affine (like the
            # BatchNorm's): GroupNorm with one group per head does exactly that on (N, H*Q).
            self.query_norm_layer = nn.GroupNorm(heads, heads * k_dim)
        else:
            self.query_norm_layer = None

        # Section 3.2, product keys: per head, two sets of S sub-keys of P = Q/2 dims each; the
        # full keys are the S*S concatenations (sub-key i of half 0, sub-key j of half 1).
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2))
        # Section 3.1, values: one row per slot, slot id = i * S + j. An EmbeddingBag so that a
        # token's H*K weighted rows are gathered and summed in one kernel (the torch path).
        self.values_dtype = values_dtype
        if values is None:
            self.values = nn.EmbeddingBag(n_keys**2, self.v_dim, mode="sum", dtype=VALUES_DTYPES[values_dtype])
            self.owns_values = True
        else:  # a table owned elsewhere: the Transformer's, read by all its memory layers (share_values)
            self.use_values(values, owned=False)
        # The only (a, b) rank pairs of the two per-half top-K lists that can reach the top-K
        # (see `_product_topk`): derived from K, so not saved in checkpoints.
        pair_a_C, pair_b_C = eligible_rank_pairs(knn)
        self.register_buffer("pair_a", pair_a_C, persistent=False)
        self.register_buffer("pair_b", pair_b_C, persistent=False)

        self.observer: Optional[Callable[[Tensor, Tensor], None]] = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, cfg: MemoryConfig, values: Optional[nn.Module] = None) -> "ProductKeyMemory":
        return cls(dim, **_layer_args(cfg), values=values)

    @staticmethod
    def new_values(n_keys: int, v_dim: int, values_dtype: str = "float32") -> nn.EmbeddingBag:
        """A value table `(n_keys**2, v_dim)` initialised as a layer initialises its own (for a
        table that several layers share, created by its owner)."""
        table = nn.EmbeddingBag(n_keys**2, v_dim, mode="sum", dtype=VALUES_DTYPES[values_dtype])
        nn.init.normal_(table.weight, mean=0.0, std=v_dim**-0.5)  # as in reset_parameters
        return table

    def use_values(self, table: nn.Module, owned: bool) -> None:
        """Read `table` from now on. `owned`: it is this layer's, registered here (in parameters()
        and state_dict()). Otherwise this layer keeps a plain reference to a table that its owner
        registers (the Transformer's shared table), so that the table is held, saved and
        optimised once; never through class-level state."""
        if owned:
            self.values = table
        else:
            self._modules.pop("values", None)
            object.__setattr__(self, "values", table)
        self.owns_values = owned

    def reset_parameters(self) -> None:
        """The memory owns its init (the transformer's global init leaves it alone)."""
        self.query_proj.reset_parameters()  # PyTorch's default, as XLM's query network
        if self.query_norm_layer is not None:
            self.query_norm_layer.reset_parameters()
        # Uniform keys in +-1/sqrt(P), independently per head and half (XLM get_uniform_keys).
        bound = 1.0 / math.sqrt(self.k_dim // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        # Values ~ N(0, 1/V) (XLM), so a read of unit-sum weights has roughly unit-norm output.
        if self.owns_values:  # a shared table is initialised by its owner, once
            nn.init.normal_(self.values.weight, mean=0.0, std=self.v_dim**-0.5)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_keys={self.n_keys} ({self.n_keys**2} slots), heads={self.heads}, "
            f"knn={self.knn}, k_dim={self.k_dim}, v_dim={self.v_dim}, query_norm={self.query_norm}, "
            f"kernel={self.kernel}, values_dtype={self.values_dtype}"
        )

    # --- section 3.1: query network -------------------------------------------------------------

    def query(self, x: Tensor) -> Tensor:
        """`(..., D)` -> `(..., H, Q)`: input dropout, projection, query norm, query dropout."""
        lead_shape = x.shape[:-1]
        x_ND = x.reshape(-1, self.dim)  # flatten leading dims: one row per token
        x_ND = F.dropout(x_ND, p=self.input_dropout, training=self.training)
        q_NF = self.query_proj(x_ND)  # F = H*Q, the layout BatchNorm1d normalises per feature
        if self.query_norm_layer is not None:
            q_NF = self.query_norm_layer(q_NF)
        q_NF = F.dropout(q_NF, p=self.query_dropout, training=self.training)
        return q_NF.view(*lead_shape, self.heads, self.k_dim)  # split features into heads

    # --- section 3.2: exact top-k over product keys ----------------------------------------------

    def lookup(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """`(..., D)` -> `(weights, indices)`, each `(..., H, K)`, sorted by descending score.

        Exactly the top-K of `q[:P]·keys[h,0,i] + q[P:]·keys[h,1,j]` over all S*S pairs (i, j):
        a pair in the global top-K has both its halves in their half's top-K (replacing a half
        by a better-scoring one of its own half only raises the sum), so the K*K sums of the two
        per-half top-K lists contain the global top-K (section 3.2). Weights are the softmax of
        the K scores, computed in fp32; indices are int64 slot ids i * S + j.
        """
        q_NHQ = self.query(x)
        lead_shape = q_NHQ.shape[:-2]
        q_NHQ = q_NHQ.reshape(-1, self.heads, self.k_dim)  # flatten leading dims
        scores_NHK, indices_NHK = self._product_topk(q_NHQ)
        # Softmax in fp32 even under bf16 autocast: K close scores need the mantissa.
        weights_NHK = F.softmax(scores_NHK.float(), dim=-1)
        out_shape = (*lead_shape, self.heads, self.knn)  # restore leading dims
        return weights_NHK.view(out_shape), indices_NHK.view(out_shape)

    def _product_topk(self, q_NHQ: Tensor) -> Tuple[Tensor, Tensor]:
        """Scores `(N, H, K)` (fp32, descending) and slot ids `(N, H, K)` of the exact top-K."""
        K, S, P = self.knn, self.n_keys, self.k_dim // 2
        q1_NHP, q2_NHP = q_NHQ[..., :P], q_NHQ[..., P:]  # the two halves of each query
        # Scores of every sub-key of each half: H small matmuls (N, P) x (P, S).
        s1_NHS = torch.einsum("nhp,hsp->nhs", q1_NHP, self.keys[:, 0])
        s2_NHS = torch.einsum("nhp,hsp->nhs", q2_NHP, self.keys[:, 1])
        top1_NHK, i_NHK = s1_NHS.topk(K, dim=-1)  # best K sub-keys of half 0 (sorted)
        top2_NHK, j_NHK = s2_NHS.topk(K, dim=-1)  # best K sub-keys of half 1
        # Candidate sums top1[a] + top2[b], in fp32 so the final ranking is not made in bf16, over
        # the C ~ K ln K rank pairs that can win (`eligible_rank_pairs`) instead of all K*K. The
        # ranking needs no gradient; the K winners' scores are re-added below, the same fp32 sums.
        top1_NHK, top2_NHK = top1_NHK.float(), top2_NHK.float()
        with torch.no_grad():
            cand_NHC = top1_NHK[..., self.pair_a] + top2_NHK[..., self.pair_b]
            best_NHK = cand_NHC.topk(K, dim=-1).indices  # sorted by descending score
        a_NHK, b_NHK = self.pair_a[best_NHK], self.pair_b[best_NHK]  # ranks in the two half lists
        scores_NHK = top1_NHK.gather(-1, a_NHK) + top2_NHK.gather(-1, b_NHK)
        # Map the ranks back to the sub-key ids of the two halves, then to the slot id.
        i_NHK = i_NHK.gather(-1, a_NHK)
        j_NHK = j_NHK.gather(-1, b_NHK)
        return scores_NHK, i_NHK * S + j_NHK

    # --- section 3.1 / 3.3: weighted read of the values, summed over heads -----------------------

    def read_kernel(self, device: torch.device) -> str:
        """The read's path on `device`, `torch` or `triton` (`kernels.resolve_kernel`)."""
        return kernels.resolve_kernel(self.kernel, device)

    def forward(self, x: Tensor) -> Tensor:
        """`(..., D)` -> `(..., V)`: sum over heads and the K slots of weight * value."""
        lead_shape = x.shape[:-1]
        weights, indices = self.lookup(x)  # each (..., H, K)
        weights_NHK = weights.reshape(-1, self.heads, self.knn)  # flatten leading dims
        indices_NHK = indices.reshape(-1, self.heads, self.knn)
        if self.observer is not None:
            self.observer(indices_NHK.detach(), weights_NHK.detach())
        # One bag per token over all its H*K slots: heads are summed as in section 3.3.
        weight = self.values.weight
        # A table that reads itself (`ShardedValues`: its columns live on several ranks) takes the
        # same call; a plain table is read by the kernel.
        read = getattr(self.values, "read", None) or functools.partial(kernels.read, weight)
        out_NV = read(
            indices_NHK.flatten(1),  # (N, H*K)
            weights_NHK.flatten(1),  # (N, H*K), fp32
            kernel=self.read_kernel(weight.device),
            sparse_grad=self.sparse_grad,
        )
        out_NV = F.dropout(out_NV, p=self.value_dropout, training=self.training)
        return out_NV.view(*lead_shape, self.v_dim)  # restore leading dims
