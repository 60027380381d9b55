"""Product-key memory (Lample et al., NeurIPS 2019, "Large Memory Layers with Product Keys"), and
the variants that later papers built on it.

A memory layer maps a token's hidden state to a weighted sum of a few rows of a huge value table
(n_keys**2 rows), chosen by an exact k-nearest-neighbour search that costs O(n_keys) instead of
O(n_keys**2) thanks to product keys. The file follows the paper:

  section 3.1  query network            x -> q                    `ProductKeyMemory.query`
  section 3.2  product keys, exact knn  q -> (weights, slot ids)  `ProductKeyMemory.lookup`
  section 3.1  weighted value read      -> sum_k w_k * value[id_k]`ProductKeyMemory.forward`
  section 3.3  multi-head memory        every step above runs for H independent heads, whose
                                        reads are summed

and adds, each as an orthogonal option of `MemoryConfig` (all off by default: the 2019 layer):

  qk_norm       LayerNorm on each query half and each sub-key (UltraMem, Huang et al. 2024; also
                Memory+ for small models)                                  `query`, `sub_keys`
  values_kind   "peer": each slot is a single-neuron expert, down vector u_i and up vector v_i,
                read as sum_hk w_hk * act(x . u_i) * v_i (PEER, He 2024)   `_read`
  gate          out_proj(read * act(gate_proj(x))) (Memory+, Berges et al. 2024, "Memory
                Layers at Scale", section 3.3)                             `forward`
  balance_loss  a sub-key usage balance loss (UltraMemV2, Huang et al. 2025) `balance`

Reference implementations: facebookresearch/XLM `xlm/model/memory/memory.py` (HashingMemory with
the "pq_fast" product-quantised lookup); for the variants, facebookresearch/memory (Memory+ and its
PEER variant), lucidrains/PEER-pytorch and ZihaoHuang-notabot/Ultra-Sparse-Memory-Network (read,
not copied). Differences on purpose: no class-level shared value table (each layer owns its tables,
or is handed the tables of an explicit owner, the Transformer's, at every call), and evaluation
statistics go through an `observer` callback that receives device tensors instead of copying
indices to the host on every step.

Shape legend (suffixes on tensor names):
  N  tokens (all leading dimensions of the input flattened)
  D  model dim (input of the memory)
  H  memory heads
  Q  k_dim, the query / key dimension of one head
  P  Q // 2, one half of a query or a sub-key (the "product" halves)
  S  n_keys, sub-keys per half (the value table has S*S slots)
  K  knn, slots read per head
  C  candidate (a, b) rank pairs per head (`eligible_rank_pairs`)
  R  H*K, slots read per token
  V  v_dim, the value dimension
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.errors import require
from pkmlm.model import kernels

QUERY_NORMS = ("batchnorm", "layernorm", "none")
PLACEMENTS = ("replace", "parallel")
# Storage dtype of the value table. bfloat16 halves the bytes every read and update moves; the
# table's AdamW moments then are bfloat16 too (updates below half a bf16 step of a value are lost).
VALUES_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Memory+'s gate: silu is the paper's "swilu" (section 3.3); sigmoid the classic GLU gate.
GATES = {"none": None, "silu": F.silu, "sigmoid": torch.sigmoid}
VALUES_KINDS = ("embedding", "peer")
# PEER's expert activation act(x . u_i): GELU in lucidrains/PEER-pytorch and in the PEER variant of
# facebookresearch/memory (whose comment allows ReLU too).
PEER_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
# fp32: the query network and the sub-key scores run in fp32 under any autocast, so that the slots
# chosen are exactly those of an fp32 run (issue 11: in bf16, ~10% of (token, head) rows chose a
# different slot set). autocast: they follow autocast (bf16 matmuls: faster, approximate ranking).
RETRIEVAL_PRECISIONS = ("fp32", "autocast")


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
    input_dropout: float = 0.0  # XLM's memory dropouts (input: also feeds the gate and PEER's down vectors)
    query_dropout: float = 0.0
    value_dropout: float = 0.0  # on the layer's output
    kernel: str = "auto"  # auto (triton on CUDA when installed, else torch) | torch | triton
    values_dtype: str = "float32"  # float32 | bfloat16: storage of the value tables
    # fp32 (exact: the same slots as an fp32 run) | autocast (query and sub-key scores in bf16 under
    # bf16 autocast: faster, a few % of rows choose other slots)
    retrieval_precision: str = "fp32"
    # Memory+ (Berges et al. 2024): none | silu | sigmoid. With a gate the layer owns gate_proj
    # (dim -> v_dim) and out_proj (v_dim -> dim): out = out_proj(read * act(gate_proj(x))).
    gate: str = "none"
    # LayerNorm (gain only) over each query half and each sub-key before scoring (UltraMem; Memory+
    # for small models). Usually with query_norm=none.
    qk_norm: bool = False
    # embedding: a slot is a value row (the paper) | peer: a single-neuron expert with a down vector
    # u_i (n_keys**2 x dim) and an up vector v_i (the values), read as act(x . u_i) * v_i (He 2024)
    values_kind: str = "embedding"
    peer_activation: str = "gelu"  # gelu | relu | silu: PEER's act
    # Coefficient of the sub-key usage balance loss (UltraMemV2); 0 = off. The model returns the
    # weighted loss of a forward with `return_aux=True`; the training loop adds it to the loss.
    balance_loss: float = 0.0
    # One set of value tables read by every memory layer, owned by the Transformer (Memory+'s
    # shared pool, UltraMem's shared values: more layers query the same n_keys**2 slots; each layer
    # keeps its own query network, keys and gate).
    share_values: bool = False
    # Split each value table by columns across the processes of a distributed run (layout and
    # communication cost: pkmlm/model/sharded_values.py). Ignored with one process.
    shard_values: bool = False

    def validate(self, prefix: str = "model.memory", n_layers: Optional[int] = None) -> None:
        """Raise `ConfigError` on the first bad value; `n_layers` bounds the layer indices."""
        if n_layers is not None:
            layers = list(self.layers)
            for index in layers:
                require(
                    not isinstance(index, bool) and isinstance(index, int) and 0 <= index < n_layers,
                    f"{prefix}.layers",
                    layers,
                    f"each index must be in [0, {n_layers - 1}] for model.n_layers={n_layers}",
                )
            require(
                len(set(layers)) == len(layers), f"{prefix}.layers", layers, "indices must be distinct (no duplicates)"
            )
        for name in ("share_values", "shard_values"):
            require(isinstance(getattr(self, name), bool), f"{prefix}.{name}", getattr(self, name), "true or false")
        require(self.placement in PLACEMENTS, f"{prefix}.placement", self.placement, f"one of {'|'.join(PLACEMENTS)}")
        check_memory_args(prefix, **_layer_args(self))


def _layer_args(cfg: MemoryConfig) -> dict:
    """The fields of `cfg` that are `ProductKeyMemory` arguments (the rest place the layers)."""
    names = (
        "n_keys",
        "heads",
        "knn",
        "k_dim",
        "v_dim",
        "query_norm",
        "input_dropout",
        "query_dropout",
        "value_dropout",
        "kernel",
        "values_dtype",
        "retrieval_precision",
        "gate",
        "qk_norm",
        "values_kind",
        "peer_activation",
        "balance_loss",
    )
    return {name: getattr(cfg, name) for name in names}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    retrieval_precision: str = "fp32",
    gate: str = "none",
    qk_norm: bool = False,
    values_kind: str = "embedding",
    peer_activation: str = "gelu",
    balance_loss: float = 0.0,
) -> None:
    """The memory layer's argument checks (called by `MemoryConfig.validate`, the config boundary;
    `ProductKeyMemory` trusts its arguments)."""
    for name, value in (("n_keys", n_keys), ("heads", heads)):
        require(_is_int(value) and value >= 1, f"{prefix}.{name}", value, "a positive integer")
    require(
        _is_int(knn) and 1 <= knn <= n_keys,
        f"{prefix}.knn",
        knn,
        f"an integer in [1, {n_keys}] ({prefix}.n_keys={n_keys})",
    )
    require(
        _is_int(k_dim) and k_dim >= 2 and k_dim % 2 == 0,
        f"{prefix}.k_dim",
        k_dim,
        "an even integer >= 2 (a query splits into two halves)",
    )
    require(
        v_dim is None or (_is_int(v_dim) and v_dim >= 1),
        f"{prefix}.v_dim",
        v_dim,
        "a positive integer, or null for model.dim",
    )
    require(query_norm in QUERY_NORMS, f"{prefix}.query_norm", query_norm, f"one of {'|'.join(QUERY_NORMS)}")
    for name, p in (
        ("input_dropout", input_dropout),
        ("query_dropout", query_dropout),
        ("value_dropout", value_dropout),
    ):
        require(_is_number(p) and 0.0 <= p < 1.0, f"{prefix}.{name}", p, "a probability in [0, 1)")
    kernels.check_kernel(kernel, f"{prefix}.kernel")  # also refuses triton where it does not import
    require(values_dtype in VALUES_DTYPES, f"{prefix}.values_dtype", values_dtype, f"one of {'|'.join(VALUES_DTYPES)}")
    require(
        retrieval_precision in RETRIEVAL_PRECISIONS,
        f"{prefix}.retrieval_precision",
        retrieval_precision,
        f"one of {'|'.join(RETRIEVAL_PRECISIONS)}",
    )
    require(gate in GATES, f"{prefix}.gate", gate, f"one of {'|'.join(GATES)}")
    require(isinstance(qk_norm, bool), f"{prefix}.qk_norm", qk_norm, "true or false")
    require(values_kind in VALUES_KINDS, f"{prefix}.values_kind", values_kind, f"one of {'|'.join(VALUES_KINDS)}")
    require(
        peer_activation in PEER_ACTIVATIONS,
        f"{prefix}.peer_activation",
        peer_activation,
        f"one of {'|'.join(PEER_ACTIVATIONS)}",
    )
    require(
        _is_number(balance_loss) and math.isfinite(balance_loss) and balance_loss >= 0,
        f"{prefix}.balance_loss",
        balance_loss,
        "a finite number >= 0 (0 turns the balance loss off)",
    )


def eligible_rank_pairs(knn: int) -> Tuple[Tensor, Tensor]:
    """Rank pairs `(a, b)` (0-based, row-major) with `(a + 1) * (b + 1) <= knn`: int64 `(C,)` each.

    With both per-half top-K lists sorted by descending score, the pairs (a', b') with a' <= a and
    b' <= b all score at least as high as (a, b): (a + 1) * (b + 1) of them, itself included. So a
    pair beyond the bound has K others at least as good and is never needed: the pairs of score
    >= the K-th best form a set closed under that dominance, and any such set of at least K pairs
    holds one of exactly K, all within the bound. With ties at the K-th score, which of the tied
    slots are chosen may differ from a search over all K*K pairs; the K scores never do.
    C = sum over a of floor(K / (a + 1)) = K ln K + (2 gamma - 1) K + O(sqrt K) (Dirichlet's divisor
    sum): 119 pairs instead of 1,024 for K = 32 (16 for K = 8, 50 for K = 16).
    """
    pairs = [(a, b) for a in range(knn) for b in range(knn) if (a + 1) * (b + 1) <= knn]
    pair_a_C = torch.tensor([a for a, _ in pairs], dtype=torch.int64)
    pair_b_C = torch.tensor([b for _, b in pairs], dtype=torch.int64)
    return pair_a_C, pair_b_C


class ValueTables(NamedTuple):
    """The tables a memory layer reads: `values` `(n_keys**2, V)` (PEER: the up vectors) and, for
    `values_kind=peer`, `down` `(n_keys**2, D)` (None otherwise). Each is an `nn.EmbeddingBag` or a
    table with the same `weight` whose `read` / `dot` methods do the work (`ShardedValues`)."""

    values: nn.Module
    down: Optional[nn.Module] = None


def new_value_tables(
    n_keys: int, dim: int, v_dim: int, values_kind: str = "embedding", values_dtype: str = "float32"
) -> ValueTables:
    """Fresh, initialised tables of one memory layer, or of the pool several layers share."""
    tables = _make_value_tables(n_keys, dim, v_dim, values_kind, values_dtype)
    init_value_tables(tables)
    return tables


def _make_value_tables(n_keys: int, dim: int, v_dim: int, values_kind: str, values_dtype: str) -> ValueTables:
    """The tables, not yet initialised (`init_value_tables`). `down` is an `EmbeddingBag` like the
    values, so that every path that handles a value table (optimizer groups, sparse row updates,
    column sharding, checkpoints) handles PEER's down vectors the same way."""
    dtype = VALUES_DTYPES[values_dtype]
    values = nn.EmbeddingBag(n_keys**2, v_dim, mode="sum", dtype=dtype)
    down = nn.EmbeddingBag(n_keys**2, dim, mode="sum", dtype=dtype) if values_kind == "peer" else None
    return ValueTables(values, down)


def init_value_tables(tables: ValueTables) -> None:
    """Values ~ N(0, 1/V) (XLM), so a read of unit-sum weights has roughly unit-norm output. PEER's
    down vectors ~ N(0, 1/D), so that x . u_i has unit variance for a unit-variance input (the PEER
    variant of facebookresearch/memory draws both tables with std V^-1/2, V = D there)."""
    for table in tables:
        if table is not None:
            nn.init.normal_(table.weight, mean=0.0, std=table.weight.shape[1] ** -0.5)


class ProductKeyMemory(nn.Module):
    """A multi-head product-key memory layer: `(..., dim)` -> `(..., out_dim)` (`v_dim`, or `dim`
    with a gate, whose `out_proj` maps back to the model dim).

    Arguments are trusted: `MemoryConfig.validate` checks them at the config boundary.

    Query norm and causality: `query_norm="batchnorm"` (the paper and XLM) normalises each query
    feature with statistics over all tokens of the batch in training mode, so every token's query
    depends on the other tokens of the batch, future ones included: a BatchNorm memory is causal
    only in eval mode (running statistics). `"layernorm"` normalises each head's query per token
    and is causal in both modes; `"none"` uses the raw projection. `qk_norm` is per token too.

    Value tables: with `owns_values=True` the layer registers its own (`values`, and `down` for
    PEER); with `False` it holds none, and every call passes the tables of their owner
    (`forward(x, tables)`; the Transformer's shared pool for `share_values`).

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
        retrieval_precision: str = "fp32",
        gate: str = "none",
        qk_norm: bool = False,
        values_kind: str = "embedding",
        peer_activation: str = "gelu",
        balance_loss: float = 0.0,
        owns_values: bool = True,
    ):
        super().__init__()
        self.dim, self.n_keys, self.heads, self.knn, self.k_dim = dim, n_keys, heads, knn, k_dim
        self.v_dim = dim if v_dim is None else v_dim
        self.query_norm = query_norm
        self.input_dropout = input_dropout  # XLM's three memory dropouts (see `forward`)
        self.query_dropout = query_dropout
        self.value_dropout = value_dropout
        self.retrieval_precision = retrieval_precision
        self.gate, self.values_kind, self.peer_activation = gate, values_kind, peer_activation
        self.balance_loss_weight = float(balance_loss)
        # The read's path, resolved once here for each kind of device the layer may run on (a model
        # is built on the CPU and moved afterwards): `kernels.resolve_kernels`.
        self.kernel = kernel
        self.kernel_cuda, self.kernel_other = kernels.resolve_kernels(kernel)
        # Sparse COO gradients for the value tables (set by the optimizer for optim.sparse_values).
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
        # qk_norm: LayerNorm over the P features of each query half and of each sub-key, with a
        # learned gain and no bias (a bias on the keys would only shift a half's scores), one norm
        # shared by heads and halves: UltraMem's `query_norm` / `keys_norm` (authors' code,
        # olmo/ultramem_layer.py; also their Memory+ reimplementation, olmo/memory_plus_layer.py).
        self.query_half_norm: Optional[nn.LayerNorm] = None
        self.key_norm: Optional[nn.LayerNorm] = None
        if qk_norm:
            self.query_half_norm = nn.LayerNorm(k_dim // 2, bias=False)
            self.key_norm = nn.LayerNorm(k_dim // 2, bias=False)

        # Section 3.2, product keys: per head, two sets of S sub-keys of P = Q/2 dims each; the
        # full keys are the S*S concatenations (sub-key i of half 0, sub-key j of half 1).
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2))
        # Section 3.1, values: one row per slot, slot id = i * S + j (PEER: the up vectors, and the
        # down vectors in `down`). EmbeddingBags, so that a token's H*K weighted rows are gathered
        # and summed in one kernel (the torch path).
        self.values_dtype = values_dtype
        self.owns_values = owns_values
        self.values: Optional[nn.Module] = None
        self.down: Optional[nn.Module] = None
        if owns_values:
            self.values, self.down = _make_value_tables(n_keys, dim, self.v_dim, values_kind, values_dtype)
        # Memory+ (section 3.3): the read is gated by a projection of the input and projected back.
        self.gate_proj: Optional[nn.Linear] = None
        self.out_proj: Optional[nn.Linear] = None
        if gate != "none":
            self.gate_proj = nn.Linear(dim, self.v_dim)  # with bias (facebookresearch/memory's Linear)
            self.out_proj = nn.Linear(self.v_dim, dim, bias=False)  # a residual projection, as attn.out
        self.out_dim = dim if gate != "none" else self.v_dim
        # The only (a, b) rank pairs of the two per-half top-K lists that can reach the top-K
        # (see `_product_topk`): derived from K, so not saved in checkpoints.
        pair_a_C, pair_b_C = eligible_rank_pairs(knn)
        self.register_buffer("pair_a", pair_a_C, persistent=False)
        self.register_buffer("pair_b", pair_b_C, persistent=False)

        self.observer: Optional[Callable[[Tensor, Tensor], None]] = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, dim: int, cfg: MemoryConfig, owns_values: bool = True) -> "ProductKeyMemory":
        return cls(dim, **_layer_args(cfg), owns_values=owns_values)

    def reset_parameters(self) -> None:
        """The memory owns its init (the transformer's global init leaves it alone)."""
        self.query_proj.reset_parameters()  # PyTorch's default, as XLM's query network
        if self.query_norm_layer is not None:
            self.query_norm_layer.reset_parameters()
        # Uniform keys in +-1/sqrt(P), independently per head and half (XLM get_uniform_keys).
        bound = 1.0 / math.sqrt(self.k_dim // 2)
        nn.init.uniform_(self.keys, -bound, bound)
        if self.query_half_norm is not None and self.key_norm is not None:
            # Gains start at P^(-1/3) (UltraMem's init, olmo/ultramem_layer.py): a half's score,
            # a dot product of two normalised P-vectors, then starts with standard deviation
            # P^(1/2 - 2/3) = P^(-1/6) instead of sqrt(P), so the softmax over the K winners starts soft.
            for norm in (self.query_half_norm, self.key_norm):
                nn.init.constant_(norm.weight, (self.k_dim // 2) ** (-1 / 3))
        if self.owns_values:  # a shared pool is initialised by its owner, once
            init_value_tables(self.own_tables())
        if self.gate_proj is not None and self.out_proj is not None:
            # facebookresearch/memory (Memory+): both projections ~ N(0, 1/D); the gate's bias 0.
            nn.init.normal_(self.gate_proj.weight, mean=0.0, std=self.dim**-0.5)
            nn.init.zeros_(self.gate_proj.bias)
            nn.init.normal_(self.out_proj.weight, mean=0.0, std=self.dim**-0.5)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_keys={self.n_keys} ({self.n_keys**2} slots), heads={self.heads}, "
            f"knn={self.knn}, k_dim={self.k_dim}, v_dim={self.v_dim}, query_norm={self.query_norm}, "
            f"qk_norm={self.key_norm is not None}, values_kind={self.values_kind}, gate={self.gate}, "
            f"kernel={self.kernel}, values_dtype={self.values_dtype}, owns_values={self.owns_values}"
        )

    def own_tables(self) -> ValueTables:
        """The tables this layer registers (`owns_values=True`)."""
        if self.values is None:
            raise ValueError(
                "this memory layer reads value tables owned elsewhere (owns_values=False): "
                "pass them to forward(x, tables)"
            )
        return ValueTables(self.values, self.down)

    # --- section 3.1: query network (+ UltraMem's qk norm) ----------------------------------------

    def _retrieval_precision(self, device: torch.device):
        """`retrieval_precision=fp32`: autocast off for the query network and the sub-key scores."""
        if self.retrieval_precision == "fp32":
            return torch.autocast(device.type, enabled=False)
        return contextlib.nullcontext()

    def query(self, x: Tensor) -> Tensor:
        """`(..., D)` -> `(..., H, Q)`: input dropout, projection, query norm(s), query dropout."""
        x_ND = F.dropout(x.reshape(-1, self.dim), p=self.input_dropout, training=self.training)
        with self._retrieval_precision(x.device):
            q_NHQ = self._project_query(x_ND)
        return q_NHQ.view(*x.shape[:-1], self.heads, self.k_dim)  # restore leading dims

    def _project_query(self, x_ND: Tensor) -> Tensor:
        """`(N, D)` (input dropout applied) -> `(N, H, Q)`."""
        if self.retrieval_precision == "fp32":
            x_ND = x_ND.float()
        q_NF = self.query_proj(x_ND)  # F = H*Q, the layout BatchNorm1d normalises per feature
        if self.query_norm_layer is not None:
            q_NF = self.query_norm_layer(q_NF)
        q_NHQ = q_NF.view(-1, self.heads, self.k_dim)  # split features into heads
        if self.query_half_norm is not None:
            P = self.k_dim // 2
            q_NHQ = self.query_half_norm(q_NHQ.view(-1, self.heads, 2, P)).view(-1, self.heads, self.k_dim)
        return F.dropout(q_NHQ, p=self.query_dropout, training=self.training)

    def sub_keys(self) -> Tensor:
        """`(H, 2, S, P)`: the sub-keys the scores use (normalised with `qk_norm`)."""
        return self.keys if self.key_norm is None else self.key_norm(self.keys)

    # --- section 3.2: exact top-k over product keys ----------------------------------------------

    def lookup(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """`(..., D)` -> `(weights, indices)`, each `(..., H, K)`, sorted by descending score.

        Exactly the top-K of `q[:P]·keys[h,0,i] + q[P:]·keys[h,1,j]` over all S*S pairs (i, j):
        a pair in the global top-K has both its halves in their half's top-K (replacing a half
        by a better-scoring one of its own half only raises the sum), so the K*K sums of the two
        per-half top-K lists contain the global top-K (section 3.2). With
        `retrieval_precision=fp32` (the default) the query and the half scores are computed in fp32
        under any autocast, so the slots are those of an fp32 run. Weights are the softmax of the
        K scores, computed in fp32; indices are int64 slot ids i * S + j.
        """
        x_ND = F.dropout(x.reshape(-1, self.dim), p=self.input_dropout, training=self.training)
        weights_NHK, indices_NHK, _ = self._lookup(x_ND, with_balance=False)
        out_shape = (*x.shape[:-1], self.heads, self.knn)  # restore leading dims
        return weights_NHK.view(out_shape), indices_NHK.view(out_shape)

    def _lookup(self, x_ND: Tensor, with_balance: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """`(N, D)` (input dropout applied) -> weights `(N, H, K)` fp32, slot ids `(N, H, K)`, and
        the weighted balance loss (None unless `with_balance`)."""
        with self._retrieval_precision(x_ND.device):
            q_NHQ = self._project_query(x_ND)
            keys_H2SP = self.sub_keys()
            q_NH2P = q_NHQ.view(*q_NHQ.shape[:-1], 2, self.k_dim // 2)  # the two halves of each query
            # Scores of every sub-key of both halves of every head: one batched matmul of 2H
            # (N, P) x (P, S) products (fewer, larger ops than a matmul per half: issue 21).
            s_NH2S = torch.einsum("nhcp,hcsp->nhcs", q_NH2P, keys_H2SP)
        scores_NHK, indices_NHK, i_NHK, j_NHK = self._product_topk(s_NH2S)
        s1_NHS, s2_NHS = s_NH2S[:, :, 0], s_NH2S[:, :, 1]
        # Softmax in fp32 even under bf16 autocast: K close scores need the mantissa.
        weights_NHK = F.softmax(scores_NHK.float(), dim=-1)
        balance = self.balance(s1_NHS, s2_NHS, i_NHK, j_NHK) if with_balance else None
        return weights_NHK, indices_NHK, balance

    def _product_topk(self, s_NH2S: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """From the sub-key scores of both halves `(N, H, 2, S)`: scores `(N, H, K)` (fp32,
        descending) and slot ids `(N, H, K)` of the exact top-K, and each half's top-K sub-key ids
        `(N, H, K)`."""
        K, S = self.knn, self.n_keys
        # Best K sub-keys of each half (sorted), both halves in one call (a top-k per row either way).
        top_NH2K, ids_NH2K = s_NH2S.topk(K, dim=-1)
        top1_NHK, top2_NHK = top_NH2K[:, :, 0].float(), top_NH2K[:, :, 1].float()
        i_NHK, j_NHK = ids_NH2K[:, :, 0], ids_NH2K[:, :, 1]
        # Candidate sums top1[a] + top2[b], in fp32 so the final ranking is not made in bf16, over
        # the C ~ K ln K rank pairs that can win (`eligible_rank_pairs`) instead of all K*K. The
        # ranking needs no gradient; the K winners' scores are re-added below, the same fp32 sums.
        # index_select rather than advanced indexing: the same values, a cheaper op on CPU.
        with torch.no_grad():
            cand_NHC = top1_NHK.index_select(-1, self.pair_a) + top2_NHK.index_select(-1, self.pair_b)
            best_NHK = cand_NHC.topk(K, dim=-1).indices  # sorted by descending score
        a_NHK, b_NHK = self.pair_a[best_NHK], self.pair_b[best_NHK]  # ranks in the two half lists
        scores_NHK = top1_NHK.gather(-1, a_NHK) + top2_NHK.gather(-1, b_NHK)
        # Map the ranks back to the sub-key ids of the two halves, then to the slot id.
        slot_NHK = i_NHK.gather(-1, a_NHK) * S + j_NHK.gather(-1, b_NHK)
        return scores_NHK, slot_NHK, i_NHK, j_NHK

    # --- UltraMemV2: sub-key usage balance loss ---------------------------------------------------

    def balance(self, s1_NHS: Tensor, s2_NHS: Tensor, top1_NHK: Tensor, top2_NHK: Tensor) -> Tensor:
        """`balance_loss` x the sub-key balance loss of one batch: a 0-d fp32 tensor.

        For each head h and half c, the load-balancing loss of Switch Transformer (Fedus et al.
        2022, eq. 4) over the S sub-keys, as UltraMemV2 applies it to sub-keys (authors' code,
        olmo/ultramem_layer_v2.py, `key_balance_reg_coef`):
            S * sum_s f[h, c, s] * p[h, c, s]
        f = the fraction of the batch's N*K per-half top-K selections that chose sub-key s (a count:
        no gradient), p = the mean over the N tokens of the softmax over all S scores (fp32; the
        gradient reaches the query network and the keys). It is 1 when usage and probability are
        uniform and grows as both concentrate on the same sub-keys. The loss is the sum over the
        two halves of the mean over heads (UltraMemV2 pools the heads' counts in one histogram;
        here each head's own sub-keys get their own, the same with one head), so 2 at balance.
        """
        N, H, S = s1_NHS.shape
        total = s1_NHS.new_zeros((), dtype=torch.float32)
        for s_NHS, top_NHK in ((s1_NHS, top1_NHK), (s2_NHS, top2_NHK)):
            p_HS = F.softmax(s_NHS.float(), dim=-1).mean(0)
            ids_HNK = top_NHK.detach().transpose(0, 1).reshape(H, -1)  # (H, N*K) sub-key ids
            count_HS = torch.zeros(H, S, dtype=torch.float32, device=s_NHS.device)
            count_HS.scatter_add_(1, ids_HNK, torch.ones_like(ids_HNK, dtype=torch.float32))
            f_HS = count_HS / ids_HNK.shape[1]
            total = total + (S * (f_HS * p_HS).sum(-1)).mean()
        return self.balance_loss_weight * total

    # --- section 3.1 / 3.3: weighted read of the values, summed over heads (+ PEER, Memory+) -----

    def _kernel(self, weight: Tensor) -> str:
        """The read's path for a table on `weight`'s device, as resolved when the layer was built."""
        kernel = self.kernel_cuda if weight.device.type == "cuda" else self.kernel_other
        if kernel is None:  # triton asked for off CUDA without the interpreter: its one-line refusal
            return kernels.resolve_kernel(self.kernel, weight.device)
        return kernel

    def _read(self, tables: ValueTables, x_ND: Tensor, weights_NHK: Tensor, indices_NHK: Tensor) -> Tensor:
        """`(N, V)`: one bag per token over all its R = H*K slots (heads summed, section 3.3).

        PEER (values_kind=peer): slot i is an expert act(x . u_i) * v_i, so the read is the same
        weighted read of the up vectors with weights w_hk * act(x . u_{i_hk}) (He 2024, eq. 4-5).
        """
        indices_NR = indices_NHK.flatten(1)
        weights_NR = weights_NHK.flatten(1)  # fp32
        if tables.down is not None:
            down = tables.down
            dot = getattr(down, "dot", None) or functools.partial(kernels.dot, down.weight)
            h_NR = dot(indices_NR, x_ND, sparse_grad=self.sparse_grad)  # x . u_i, fp32
            weights_NR = weights_NR * PEER_ACTIVATIONS[self.peer_activation](h_NR)
        values = tables.values
        weight = values.weight
        # A table that reads itself (`ShardedValues`: its columns live on several ranks) takes the
        # same call; a plain table is read by the kernel.
        read = getattr(values, "read", None) or functools.partial(kernels.read, weight)
        return read(indices_NR, weights_NR, kernel=self._kernel(weight), sparse_grad=self.sparse_grad)

    def forward(self, x: Tensor, tables: Optional[ValueTables] = None, *, return_aux: bool = False):
        """`(..., D)` -> `(..., out_dim)`; with `return_aux=True`, `(out, aux)` where `aux` is the
        0-d fp32 weighted balance loss of this call (zero when `balance_loss` is 0).

        `tables`: the value tables to read, for a layer built with `owns_values=False`; a layer
        that owns its tables reads them (then `tables` must be None).
        """
        if tables is None:
            tables = self.own_tables()
        elif self.owns_values:
            raise ValueError("this memory layer owns its value tables; call it without `tables`")
        lead_shape = x.shape[:-1]
        # XLM's input dropout, once: the query, Memory+'s gate and PEER's down vectors all see it.
        x_ND = F.dropout(x.reshape(-1, self.dim), p=self.input_dropout, training=self.training)
        with_balance = return_aux and self.balance_loss_weight > 0
        weights_NHK, indices_NHK, balance = self._lookup(x_ND, with_balance)
        if self.observer is not None:
            self.observer(indices_NHK.detach(), weights_NHK.detach())
        out_NV = self._read(tables, x_ND, weights_NHK, indices_NHK)
        if self.gate_proj is not None and self.out_proj is not None:
            # Memory+ (Berges et al. 2024, section 3.3): out_proj(read * act(gate_proj(x))).
            gate_NV = GATES[self.gate](self.gate_proj(x_ND))
            out_NV = self.out_proj(out_NV.to(gate_NV.dtype) * gate_NV)
        out_NV = F.dropout(out_NV, p=self.value_dropout, training=self.training)
        out = out_NV.view(*lead_shape, self.out_dim)  # restore leading dims
        if not return_aux:
            return out
        if balance is None:
            balance = torch.zeros((), dtype=torch.float32, device=x.device)
        return out, balance
