"""PEER (He 2024, "Mixture of A Million Experts"): each slot is a single-neuron expert with a down
vector u_i (n_keys**2 x dim) and an up vector v_i (the values), read as
    sum_hk w_hk * act(x . u_i) * v_i                     (He 2024, eq. 4-5)
i.e. the 2019 layer's weighted read of the up vectors with weights w_hk * act(x . u_{i_hk}).

References: lucidrains/PEER-pytorch and the PEER variant of facebookresearch/memory (read, not
copied). The down vectors are a second value table (`ValueTables.down`, an `EmbeddingBag` like the
values), so every path that handles a value table (optimizer groups, sparse row updates, column
sharding, shared pools, checkpoints) handles them the same way.

Shape legend: as pkmlm/model/memory.py (N tokens, D model dim, R = H*K slots read per token).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import torch.nn.functional as F
from torch import Tensor

from pkmlm.errors import choices, require_one_of
from pkmlm.model import kernels
from pkmlm.model.variants.base import MemoryVariant, option
from pkmlm.model.variants.registry import register

ValuesKind = Literal["embedding", "peer"]
# PEER's expert activation act(x . u_i): GELU in lucidrains/PEER-pytorch and in the PEER variant of
# facebookresearch/memory (whose comment allows ReLU too).
PeerActivation = Literal["gelu", "relu", "silu"]
PEER_ACTIVATIONS = dict(zip(choices(PeerActivation), (F.gelu, F.relu, F.silu)))


@dataclass
class PEERFields:
    # embedding: a slot is a value row (the paper) | peer: a single-neuron expert with a down vector
    # u_i (n_keys**2 x dim) and an up vector v_i (the values), read as act(x . u_i) * v_i (He 2024)
    values_kind: str = "embedding"
    peer_activation: str = "gelu"  # gelu | relu | silu: PEER's act


@register
class PEER(MemoryVariant):
    kind = "peer"
    display_name = "PEER"
    precedence = 20
    example = {"values_kind": "peer"}
    in_hf_export = True  # checkpoint/modeling_pkmlm.py mirrors it (tests/e2e/test_hf_export.py)
    Fields = PEERFields
    down_name = "PEER's down vectors (model.memory.values_kind=peer) have model.dim"

    @classmethod
    def describes(cls, memory: Any) -> bool:
        return option(memory, "values_kind") == "peer"

    @classmethod
    def check(cls, memory: Any, prefix: str) -> None:
        values_kind, activation = memory.values_kind, memory.peer_activation
        require_one_of(f"{prefix}.values_kind", values_kind, ValuesKind)
        require_one_of(f"{prefix}.peer_activation", activation, PeerActivation)

    @classmethod
    def down_dim(cls, memory: Any, dim: int) -> Optional[int]:
        """The down vectors u_i have the model dim (they dot the memory's input)."""
        return dim if cls.describes(memory) else None

    @classmethod
    def active(cls, layer: Any) -> bool:
        return cls.describes(layer)

    @classmethod
    def read_columns(cls, layer: Any) -> int:
        return layer.dim if cls.active(layer) else 0  # one down vector per slot read

    @classmethod
    def macs(cls, layer: Any) -> Dict[str, int]:
        """x . u_i for the H*K slots read."""
        return {"down": layer.heads * layer.knn * layer.dim if cls.active(layer) else 0}

    @classmethod
    def slot_weights(cls, layer: Any, tables: Any, x_ND: Tensor, weights_NR: Tensor, indices_NR: Tensor) -> Tensor:
        """w_hk * act(x . u_{i_hk}) `(N, R)` fp32. A table that computes its own dot (`ShardedValues`:
        its columns live on several ranks) takes the same call; a plain one is read by the kernel."""
        down = tables.down
        dot = getattr(down, "dot", None) or functools.partial(kernels.dot, down.weight)
        h_NR = dot(indices_NR, x_ND, sparse_grad=layer.sparse_grad)  # x . u_i, fp32
        return weights_NR * PEER_ACTIVATIONS[layer.peer_activation](h_NR)
