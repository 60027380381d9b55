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

The variants later papers built on it (PEER, Memory+, UltraMem) are registered types, one module
each under pkmlm/model/variants/ (the contract: variants/base.py). Each owns its options (fields of
`MemoryConfig`, all off by default: the 2019 layer), their checks and counts, and hooks that this
layer calls at fixed points, in paper order:

  section 3.1  after the query network       `build_query`, `query`, `keys`
  section 3.2  after the exact top-k         `aux_loss` (UltraMemV2's balance loss)
  section 3.1  the weighted read             `slot_weights` (PEER's act(x . u_i))
  section 3.3  after the read                `build_output`, `output` (Memory+'s gate)

This file never names a variant.

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
from typing import Callable, Dict, List, Literal, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.errors import choices, require, require_one_of
from pkmlm.model import kernels, variants
from pkmlm.model.variants import is_int as _is_int
from pkmlm.model.variants import is_number as _is_number

QueryNorm = Literal["batchnorm", "layernorm", "none"]
Placement = Literal["replace", "parallel"]
# Storage dtype of the value table. bfloat16 halves the bytes every read and update moves; the
# table's AdamW moments then are bfloat16 too (updates below half a bf16 step of a value are lost).
ValuesDtype = Literal["float32", "bfloat16"]
VALUES_DTYPES = dict(zip(choices(ValuesDtype), (torch.float32, torch.bfloat16)))
# fp32: the query network and the sub-key scores run in fp32 under any autocast, so that the slots
# chosen are exactly those of an fp32 run (issue 11: in bf16, ~10% of (token, head) rows chose a
# different slot set). autocast: they follow autocast (bf16 matmuls: faster, approximate ranking).
RetrievalPrecision = Literal["fp32", "autocast"]


@dataclass
class LayerFields:
    """Where the memory layers go and the 2019 layer's hyper-parameters (defaults: the paper's main
    setting)."""

    # The registered variant the options describe (`variants.kind_of`): null names it from the
    # options (every config saved before the registry has none); a set kind must be that one.
    kind: Optional[str] = None
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
    # The retrieval's top-k on CPU: auto (the C++ kernel where it builds, else torch.topk) | torch |
    # cpp (refused where it cannot be built). Bit for bit the same slots, outputs and gradients
    # either way (pkmlm/model/kernels/cpu_topk.cpp); CUDA always takes torch.topk.
    topk_impl: str = "auto"
    # The value read's backward on CPU: torch (embedding_bag's; the default, the golden run's bits) |
    # cpp (one fused C++ pass for the table's and the weights' gradients, kernels/cpu_read.cpp:
    # faster, equal to rounding, not bit for bit; refused where it cannot be built).
    read_impl: str = "torch"
    # The sub-key scores' backward on CPU: dense (the (N, H, 2, S) score gradient and two batched
    # matmuls: the default, the golden run's bits) | sparse (the K winners' sub-keys of each half only,
    # kernels/cpu_scores.cpp: faster, equal to rounding, not bit for bit; refused where it cannot be
    # built; dense with a variant's auxiliary loss, which reads every score).
    scores_backward: str = "dense"
    # One set of value tables read by every memory layer, owned by the Transformer (Memory+'s
    # shared pool, UltraMem's shared values: more layers query the same n_keys**2 slots; each layer
    # keeps its own query network, keys and gate).
    share_values: bool = False
    # Split each value table by columns across the processes of a distributed run (layout and
    # communication cost: pkmlm/model/sharded_values.py). Ignored with one process.
    shard_values: bool = False


@dataclass
class MemoryConfig(*reversed(variants.field_classes()), LayerFields):
    """`model.memory`: `LayerFields`, then every registered variant's options (`pkmlm.model.variants`,
    in registration order), all off by default: the 2019 layer."""

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
        require_one_of(f"{prefix}.placement", self.placement, Placement)
        check_memory_args(prefix, **{name: getattr(self, name) for name in _LAYER_ARGS})
        for variant in variants.registered():
            variant.check(self, prefix)
            if n_layers is not None:
                variant.check_layers(self, prefix, n_layers)
        variants.check_kind(self, prefix)


# The fields of `MemoryConfig` that are the 2019 layer's `ProductKeyMemory` arguments (the variants'
# options are arguments too; the rest place the layers).
_LAYER_ARGS = (
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
    "topk_impl",
    "read_impl",
    "scores_backward",
)


def _layer_args(cfg: MemoryConfig) -> dict:
    """The fields of `cfg` that are `ProductKeyMemory` arguments: the 2019 layer's and the variants'."""
    names = (*_LAYER_ARGS, *variants.layer_option_defaults())
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
    retrieval_precision: str = "fp32",
    topk_impl: str = "auto",
    read_impl: str = "torch",
    scores_backward: str = "dense",
) -> None:
    """The 2019 layer's argument checks (called by `MemoryConfig.validate`, the config boundary,
    before each variant's `check`; `ProductKeyMemory` trusts its arguments)."""
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
    require_one_of(f"{prefix}.query_norm", query_norm, QueryNorm)
    for name, p in (
        ("input_dropout", input_dropout),
        ("query_dropout", query_dropout),
        ("value_dropout", value_dropout),
    ):
        require(_is_number(p) and 0.0 <= p < 1.0, f"{prefix}.{name}", p, "a probability in [0, 1)")
    kernels.check_kernel(kernel, f"{prefix}.kernel")  # also refuses triton where it does not import
    require_one_of(f"{prefix}.values_dtype", values_dtype, ValuesDtype)
    require_one_of(f"{prefix}.retrieval_precision", retrieval_precision, RetrievalPrecision)
    kernels.check_topk_impl(topk_impl, f"{prefix}.topk_impl")  # also refuses cpp where it cannot be built
    kernels.check_read_impl(read_impl, f"{prefix}.read_impl")  # the same
    kernels.check_scores_backward(scores_backward, f"{prefix}.scores_backward")  # the same


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
    """The tables a memory layer reads: `values` `(n_keys**2, V)` and, for a variant that reads a
    second per-slot vector (`MemoryVariant.down_dim`: PEER's down vectors), `down` (None otherwise).
    Each is an `nn.EmbeddingBag` or a table with the same `weight` whose `read` / `dot` methods do
    the work (`ShardedValues`)."""

    values: nn.Module
    down: Optional[nn.Module] = None


def new_value_tables(
    n_keys: int, v_dim: int, down_dim: Optional[int] = None, values_dtype: str = "float32"
) -> ValueTables:
    """Fresh, initialised tables of one memory layer, or of the pool several layers share.
    `down_dim`: the columns of the second per-slot table (`variants.down_dim`), None for none."""
    tables = _make_value_tables(n_keys, v_dim, down_dim, values_dtype)
    init_value_tables(tables)
    return tables


def _make_value_tables(n_keys: int, v_dim: int, down_dim: Optional[int], values_dtype: str) -> ValueTables:
    """The tables, not yet initialised (`init_value_tables`). `down` is an `EmbeddingBag` like the
    values, so that every path that handles a value table (optimizer groups, sparse row updates,
    column sharding, checkpoints) handles a variant's second table (PEER's down vectors) the same way."""
    dtype = VALUES_DTYPES[values_dtype]
    values = nn.EmbeddingBag(n_keys**2, v_dim, mode="sum", dtype=dtype)
    down = nn.EmbeddingBag(n_keys**2, down_dim, mode="sum", dtype=dtype) if down_dim is not None else None
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
        topk_impl: str = "auto",
        read_impl: str = "torch",
        scores_backward: str = "dense",
        owns_values: bool = True,
        **options,
    ):
        """`options`: the variants' options (`variants.layer_options`), kept as attributes of the same name."""
        super().__init__()
        self.dim, self.n_keys, self.heads, self.knn, self.k_dim = dim, n_keys, heads, knn, k_dim
        self.v_dim = dim if v_dim is None else v_dim
        self.out_dim = self.v_dim  # a variant that projects the read back sets its own (Memory+)
        self.query_norm = query_norm
        self.input_dropout = input_dropout  # XLM's three memory dropouts (see `forward`)
        self.query_dropout = query_dropout
        self.value_dropout = value_dropout
        self.retrieval_precision = retrieval_precision
        self.options = variants.layer_options(options)
        for name, value in self.options.items():
            setattr(self, name, value)
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
        # Every variant builds its query-side modules here, before the keys: the parameter order
        # (saved in optimizer states) is the one this layer always had.
        for variant in variants.registered():
            variant.build_query(self)

        # Section 3.2, product keys: per head, two sets of S sub-keys of P = Q/2 dims each; the
        # full keys are the S*S concatenations (sub-key i of half 0, sub-key j of half 1).
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, k_dim // 2))
        # Section 3.1, values: one row per slot, slot id = i * S + j (and a variant's second per-slot
        # table in `down`: PEER's down vectors). EmbeddingBags, so that a token's H*K weighted rows
        # are gathered and summed in one kernel (the torch path).
        self.values_dtype = values_dtype
        self.owns_values = owns_values
        self.values: Optional[nn.Module] = None
        self.down: Optional[nn.Module] = None
        if owns_values:
            down_dim = variants.down_dim(self.options, dim)
            self.values, self.down = _make_value_tables(n_keys, self.v_dim, down_dim, values_dtype)
        for variant in variants.registered():
            variant.build_output(self)  # e.g. Memory+'s gate_proj and out_proj (section 3.3)
        # The variants whose forward hooks this layer calls (their options are on here).
        self.variants = tuple(variant for variant in variants.registered() if variant.active(self))
        self._init_top_k(topk_impl)
        self._init_backward(read_impl, scores_backward)

        self.observer: Optional[Callable[[Tensor, Tensor], None]] = None
        self.reset_parameters()

    def _init_top_k(self, topk_impl: str) -> None:
        """The product-key top-k's state (section 3.2, `_product_topk`): its path on CPU tensors
        (`cpp` or `torch`), resolved once here (`auto` builds or loads the C++ kernel now, never
        inside a traced forward), and the only (a, b) rank pairs of the two per-half top-K lists
        that can reach the top-K: derived from K, so not saved in checkpoints."""
        self.topk_impl = topk_impl
        self.topk_cpu = kernels.resolve_topk(topk_impl)
        pair_a_C, pair_b_C = eligible_rank_pairs(self.knn)
        self.register_buffer("pair_a", pair_a_C, persistent=False)
        self.register_buffer("pair_b", pair_b_C, persistent=False)

    def _init_backward(self, read_impl: str, scores_backward: str) -> None:
        """The CPU backward paths: the read's on CPU tables (`kernels.read`: torch | cpp) and the sub-key
        scores' (`kernels.sparse_search`: dense | sparse), whose C++ library is built or loaded here
        (as the top-k's), never inside a traced forward; both were checked at the config boundary
        (`check_memory_args`), where a library that cannot be built is refused."""
        if read_impl == "cpp" or scores_backward == "sparse":
            kernels.cpu_read.load()  # the one library of the C++ CPU kernels
        self.read_impl = read_impl
        self.scores_backward = scores_backward

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
        if self.owns_values:  # a shared pool is initialised by its owner, once
            init_value_tables(self.own_tables())
        for variant in self.variants:  # after the values: the RNG order this layer always had
            variant.reset_parameters(self)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_keys={self.n_keys} ({self.n_keys**2} slots), heads={self.heads}, "
            f"knn={self.knn}, k_dim={self.k_dim}, v_dim={self.v_dim}, query_norm={self.query_norm}, "
            + "".join(f"{name}={value}, " for name, value in self.options.items())
            + f"kernel={self.kernel}, values_dtype={self.values_dtype}, owns_values={self.owns_values}"
        )

    def read_params(self) -> int:
        """Table parameters one token reads: H * K rows of v_dim, plus the variants' columns per
        slot (`read_columns`: PEER's down vectors, D)."""
        columns = self.v_dim + sum(variant.read_columns(self) for variant in variants.registered())
        return self.heads * self.knn * columns

    def macs(self) -> Dict[str, int]:
        """Multiply-adds per token, by part: the 2019 layer's (query D * H * Q, keys H * S * Q, read
        H * K * V) and each variant's (`MemoryVariant.macs`); metrics/flops.py documents them."""
        H, K, S, Q, D, V = self.heads, self.knn, self.n_keys, self.k_dim, self.dim, self.v_dim
        macs = {"query": D * H * Q, "keys": H * S * Q, "read": H * K * V}
        for variant in variants.registered():
            macs.update(variant.macs(self))
        return macs

    def own_tables(self) -> ValueTables:
        """The tables this layer registers (`owns_values=True`)."""
        if self.values is None:
            raise ValueError(
                "this memory layer reads value tables owned elsewhere (owns_values=False): "
                "pass them to forward(x, tables)"
            )
        return ValueTables(self.values, self.down)

    # --- section 3.1: query network (+ the variants' `query` and `keys` hooks) --------------------

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
        for variant in self.variants:  # e.g. UltraMem's qk norm of each query half
            q_NHQ = variant.query(self, q_NHQ)
        return F.dropout(q_NHQ, p=self.query_dropout, training=self.training)

    def sub_keys(self) -> Tensor:
        """`(H, 2, S, P)`: the sub-keys the scores use (e.g. normalised by UltraMem's qk norm)."""
        keys_H2SP = self.keys
        for variant in self.variants:
            keys_H2SP = variant.keys(self, keys_H2SP)
        return keys_H2SP

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
        weights_NHK, indices_NHK, _ = self._lookup(x_ND, with_aux=False)
        out_shape = (*x.shape[:-1], self.heads, self.knn)  # restore leading dims
        return weights_NHK.view(out_shape), indices_NHK.view(out_shape)

    def _lookup(self, x_ND: Tensor, with_aux: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """`(N, D)` (input dropout applied) -> weights `(N, H, K)` fp32, slot ids `(N, H, K)`, and
        the sum of the variants' weighted auxiliary losses (None unless `with_aux`)."""
        with self._retrieval_precision(x_ND.device):
            q_NHQ = self._project_query(x_ND)
            keys_H2SP = self.sub_keys()
            q_NH2P = q_NHQ.view(*q_NHQ.shape[:-1], 2, self.k_dim // 2)  # the two halves of each query
            # `scores_backward=sparse` (opt-in, CPU): the scores and the search below as one op whose
            # backward reads only the K winners' sub-keys (kernels/cpu_scores.py); not with an
            # auxiliary loss, which reads every sub-key score. None where it does not apply.
            sparse = self.scores_backward == "sparse" and not with_aux
            found = kernels.sparse_search(q_NH2P, keys_H2SP, self.pair_a, self.pair_b, self.knn) if sparse else None
            if found is None:
                # Scores of every sub-key of both halves of every head: one batched matmul of 2H
                # (N, P) x (P, S) products (fewer, larger ops than a matmul per half: issue 21).
                s_NH2S = torch.einsum("nhcp,hcsp->nhcs", q_NH2P, keys_H2SP)
        if found is not None:
            scores_NHK, indices_NHK, i_NHK, j_NHK = found
        else:
            scores_NHK, indices_NHK, i_NHK, j_NHK = self._product_topk(s_NH2S)
        # Softmax in fp32 even under bf16 autocast: K close scores need the mantissa.
        weights_NHK = F.softmax(scores_NHK.float(), dim=-1)
        aux = None
        if with_aux:
            for variant in self.variants:  # e.g. UltraMemV2's sub-key balance loss
                if variant.has_aux(self):
                    loss = variant.aux_loss(self, s_NH2S[:, :, 0], s_NH2S[:, :, 1], i_NHK, j_NHK)
                    aux = loss if aux is None else aux + loss
        return weights_NHK, indices_NHK, aux

    def _product_topk(self, s_NH2S: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """From the sub-key scores of both halves `(N, H, 2, S)`: scores `(N, H, K)` (fp32,
        descending) and slot ids `(N, H, K)` of the exact top-K, and each half's top-K sub-key ids
        `(N, H, K)`."""
        # Best K sub-keys of each half (sorted), both halves in one search (a top-k per row either
        # way). Then candidate sums top1[a] + top2[b], in fp32 so the final ranking is not made in
        # bf16, over the C ~ K ln K rank pairs that can win (`eligible_rank_pairs`) instead of all
        # K*K, and their top-K: the winners' ranks (a, b) in the two half lists, mapped back to the
        # sub-key ids of the two halves and the slot id i * S + j. The ranking needs no gradient;
        # the K winners' scores are re-added, the same fp32 sums. On CPU the whole search is one C++
        # pass forward and one backward (`topk_impl`, `kernels.product_search`): the same values,
        # indices and gradients as the torch ops, bit for bit, without their copies, gathers and
        # dense zero fills (issue 21).
        return kernels.product_search(s_NH2S, self.pair_a, self.pair_b, self.knn, self.topk_cpu)

    # --- section 3.1 / 3.3: weighted read of the values, summed over heads (+ the variants' hooks) --

    def _kernel(self, weight: Tensor) -> str:
        """The read's path for a table on `weight`'s device, as resolved when the layer was built."""
        kernel = self.kernel_cuda if weight.device.type == "cuda" else self.kernel_other
        if kernel is None:  # triton asked for off CUDA without the interpreter: its one-line refusal
            return kernels.resolve_kernel(self.kernel, weight.device)
        return kernel

    def _read(self, tables: ValueTables, x_ND: Tensor, weights_NHK: Tensor, indices_NHK: Tensor) -> Tensor:
        """`(N, V)`: one bag per token over all its R = H*K slots (heads summed, section 3.3).

        A variant may reweigh the slots first (`slot_weights`; PEER: w_hk * act(x . u_{i_hk}), the
        same weighted read of the up vectors, He 2024, eq. 4-5).
        """
        indices_NR = indices_NHK.flatten(1)
        weights_NR = weights_NHK.flatten(1)  # fp32
        for variant in self.variants:
            weights_NR = variant.slot_weights(self, tables, x_ND, weights_NR, indices_NR)
        values = tables.values
        weight = values.weight
        # A table that reads itself (`ShardedValues`: its columns live on several ranks) takes the
        # same call; a plain table is read by the kernel.
        read = getattr(values, "read", None) or functools.partial(kernels.read, weight, read_impl=self.read_impl)
        return read(indices_NR, weights_NR, kernel=self._kernel(weight), sparse_grad=self.sparse_grad)

    def forward(self, x: Tensor, tables: Optional[ValueTables] = None, *, return_aux: bool = False):
        """`(..., D)` -> `(..., out_dim)`; with `return_aux=True`, `(out, aux)` where `aux` is the
        0-d fp32 sum of the variants' weighted auxiliary losses of this call (UltraMemV2's balance
        loss; zero when none is on).

        `tables`: the value tables to read, for a layer built with `owns_values=False`; a layer
        that owns its tables reads them (then `tables` must be None).
        """
        if tables is None:
            tables = self.own_tables()
        elif self.owns_values:
            raise ValueError("this memory layer owns its value tables; call it without `tables`")
        lead_shape = x.shape[:-1]
        # XLM's input dropout, once: the query and every variant's hooks (Memory+'s gate, PEER's
        # down vectors) see it.
        x_ND = F.dropout(x.reshape(-1, self.dim), p=self.input_dropout, training=self.training)
        with_aux = return_aux and any(variant.has_aux(self) for variant in self.variants)
        weights_NHK, indices_NHK, aux = self._lookup(x_ND, with_aux)
        if self.observer is not None:
            self.observer(indices_NHK.detach(), weights_NHK.detach())
        out_NV = self._read(tables, x_ND, weights_NHK, indices_NHK)
        for variant in self.variants:  # e.g. Memory+'s gate and projection back (section 3.3)
            out_NV = variant.output(self, x_ND, out_NV)
        out_NV = F.dropout(out_NV, p=self.value_dropout, training=self.training)
        out = out_NV.view(*lead_shape, self.out_dim)  # restore leading dims
        if not return_aux:
            return out
        if aux is None:
            aux = torch.zeros((), dtype=torch.float32, device=x.device)
        return out, aux
