"""UltraMem-style memory (Huang et al. 2024, "Ultra-Sparse Memory Network"; UltraMemV2, Huang et al.
2025): its two additions to the 2019 layer's retrieval.

  qk_norm       LayerNorm (gain only) over each query half and each sub-key before scoring
                (authors' code, olmo/ultramem_layer.py; also Memory+ for small models)
  balance_loss  a sub-key usage balance loss (UltraMemV2's key_balance_reg_coef)

An UltraMem-style run is PEER-style "pre-values" (variants/peer.py) plus the balance loss; memory
in every block beside the FFN and one shared pool are placement options (`model.memory.placement`,
`share_values`). Not here: Tucker-decomposed retrieval (TDQKR), implicit value expansion (IVE),
multi-core scoring.

Shape legend: as pkmlm/model/memory.py (N tokens, H heads, Q k_dim, P = Q // 2, S n_keys, K knn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.errors import require
from pkmlm.model.variants.base import MemoryVariant, is_number, option
from pkmlm.model.variants.peer import PEER
from pkmlm.model.variants.registry import register


@dataclass
class UltraMemFields:
    # LayerNorm (gain only) over each query half and each sub-key before scoring (UltraMem; Memory+
    # for small models). Usually with query_norm=none.
    qk_norm: bool = False
    # Coefficient of the sub-key usage balance loss (UltraMemV2); 0 = off. The model returns the
    # weighted loss of a forward with `return_aux=True`; the training loop adds it to the loss.
    balance_loss: float = 0.0


@register
class UltraMem(MemoryVariant):
    kind = "ultramem"
    display_name = "UltraMem-style"
    precedence = 40
    example = {"values_kind": "peer", "qk_norm": True, "balance_loss": 0.01}
    in_hf_export = True  # checkpoint/modeling_pkmlm.py mirrors it (tests/e2e/test_hf_export.py)
    Fields = UltraMemFields
    aux_name = "balance_loss"  # logged as train/balance_loss (train/loop.py, loss_terms)

    @classmethod
    def describes(cls, memory: Any) -> bool:
        """UltraMemV2: PEER-style pre-values with the sub-key balance loss."""
        return PEER.describes(memory) and (option(memory, "balance_loss") or 0) > 0

    @classmethod
    def details(cls, memory: Any) -> List[Tuple[int, str]]:
        out = [(10, "qk-norm")] if option(memory, "qk_norm") else []
        balance = option(memory, "balance_loss") or 0
        return out + ([(30, f"balance {balance:g}")] if balance > 0 else [])

    @classmethod
    def check(cls, memory: Any, prefix: str) -> None:
        require(isinstance(memory.qk_norm, bool), f"{prefix}.qk_norm", memory.qk_norm, "true or false")
        balance = memory.balance_loss
        require(
            is_number(balance) and math.isfinite(balance) and balance >= 0,
            f"{prefix}.balance_loss",
            balance,
            "a finite number >= 0 (0 turns the balance loss off)",
        )

    @classmethod
    def active(cls, layer: Any) -> bool:
        return layer.key_norm is not None or layer.balance_loss_weight > 0

    @classmethod
    def build_query(cls, layer: Any) -> None:
        """qk_norm: LayerNorm over the P features of each query half and of each sub-key, with a
        learned gain and no bias (a bias on the keys would only shift a half's scores), one norm
        shared by heads and halves: UltraMem's `query_norm` / `keys_norm` (authors' code,
        olmo/ultramem_layer.py; also their Memory+ reimplementation, olmo/memory_plus_layer.py)."""
        layer.balance_loss_weight = float(layer.balance_loss)
        layer.query_half_norm = None
        layer.key_norm = None
        if layer.qk_norm:
            layer.query_half_norm = nn.LayerNorm(layer.k_dim // 2, bias=False)
            layer.key_norm = nn.LayerNorm(layer.k_dim // 2, bias=False)

    @classmethod
    def reset_parameters(cls, layer: Any) -> None:
        if layer.key_norm is not None:
            # Gains start at P^(-1/3) (UltraMem's init, olmo/ultramem_layer.py): a half's score,
            # a dot product of two normalised P-vectors, then starts with standard deviation
            # P^(1/2 - 2/3) = P^(-1/6) instead of sqrt(P), so the softmax over the K winners starts soft.
            for norm in (layer.query_half_norm, layer.key_norm):
                nn.init.constant_(norm.weight, (layer.k_dim // 2) ** (-1 / 3))

    @classmethod
    def query(cls, layer: Any, q_NHQ: Tensor) -> Tensor:
        """Each query half normalised: `(N, H, Q)` -> `(N, H, Q)`."""
        if layer.query_half_norm is None:
            return q_NHQ
        H, Q = layer.heads, layer.k_dim
        return layer.query_half_norm(q_NHQ.view(-1, H, 2, Q // 2)).view(-1, H, Q)

    @classmethod
    def keys(cls, layer: Any, keys_H2SP: Tensor) -> Tensor:
        return keys_H2SP if layer.key_norm is None else layer.key_norm(keys_H2SP)

    @classmethod
    def has_aux(cls, layer: Any) -> bool:
        return layer.balance_loss_weight > 0

    @classmethod
    def aux_loss(cls, layer: Any, s1_NHS: Tensor, s2_NHS: Tensor, i_NHK: Tensor, j_NHK: Tensor) -> Tensor:
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
        for s_NHS, top_NHK in ((s1_NHS, i_NHK), (s2_NHS, j_NHK)):
            p_HS = F.softmax(s_NHS.float(), dim=-1).mean(0)
            ids_HNK = top_NHK.detach().transpose(0, 1).reshape(H, -1)  # (H, N*K) sub-key ids
            count_HS = torch.zeros(H, S, dtype=torch.float32, device=s_NHS.device)
            count_HS.scatter_add_(1, ids_HNK, torch.ones_like(ids_HNK, dtype=torch.float32))
            f_HS = count_HS / ids_HNK.shape[1]
            total = total + (S * (f_HS * p_HS).sum(-1)).mean()
        return layer.balance_loss_weight * total
