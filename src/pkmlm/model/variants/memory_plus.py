"""Memory+ (Berges et al. 2024, "Memory Layers at Scale", section 3.3): the read gated by a
projection of the input and projected back to the model dim,
    out = out_proj(read * act(gate_proj(x)))
with silu (the paper's "swilu") or sigmoid (the classic GLU gate) as act. The layer then owns
`gate_proj` (dim -> v_dim, with bias, as facebookresearch/memory's Linear) and `out_proj`
(v_dim -> dim, no bias: a residual projection, as attn.out), and its output is `dim` wide.

Memory+'s other choices are options of their own: qk norm (variants/ultramem.py, which Memory+
adds for small models) and a pool shared by several layers (`model.memory.share_values`).

Shape legend: as pkmlm/model/memory.py (N tokens, D model dim, V value dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkmlm.errors import choices, require_one_of
from pkmlm.model.variants.base import MemoryVariant, option
from pkmlm.model.variants.peer import PEER
from pkmlm.model.variants.registry import register

# Memory+'s gate: silu is the paper's "swilu" (section 3.3); sigmoid the classic GLU gate.
Gate = Literal["none", "silu", "sigmoid"]
GATES = dict(zip(choices(Gate), (None, F.silu, torch.sigmoid)))


@dataclass
class MemoryPlusFields:
    # Memory+ (Berges et al. 2024): none | silu | sigmoid. With a gate the layer owns gate_proj
    # (dim -> v_dim) and out_proj (v_dim -> dim): out = out_proj(read * act(gate_proj(x))).
    gate: str = "none"


@register
class MemoryPlus(MemoryVariant):
    kind = "memory_plus"
    display_name = "Memory+"
    precedence = 30  # a gated PEER layer is named here ("PEER + gate"), a gated UltraMem there
    example = {"gate": "silu", "qk_norm": True}
    in_hf_export = True  # checkpoint/modeling_pkmlm.py mirrors it (tests/e2e/test_hf_export.py)
    Fields = MemoryPlusFields

    @classmethod
    def describes(cls, memory: Any) -> bool:
        return option(memory, "gate", "none") not in (None, "none")

    @classmethod
    def label(cls, memory: Any) -> str:
        return "PEER + gate" if PEER.describes(memory) else cls.display_name

    @classmethod
    def check(cls, memory: Any, prefix: str) -> None:
        require_one_of(f"{prefix}.gate", memory.gate, Gate)

    @classmethod
    def active(cls, layer: Any) -> bool:
        return layer.gate_proj is not None

    @classmethod
    def macs(cls, layer: Any) -> Dict[str, int]:
        """gate_proj and out_proj."""
        return {"gate": 2 * layer.dim * layer.v_dim if cls.active(layer) else 0}

    @classmethod
    def build_output(cls, layer: Any) -> None:
        layer.gate_proj = None
        layer.out_proj = None
        if cls.describes(layer):
            layer.gate_proj = nn.Linear(layer.dim, layer.v_dim)  # with bias (facebookresearch/memory's Linear)
            layer.out_proj = nn.Linear(layer.v_dim, layer.dim, bias=False)  # a residual projection, as attn.out
            layer.out_dim = layer.dim

    @classmethod
    def reset_parameters(cls, layer: Any) -> None:
        if cls.active(layer):
            # facebookresearch/memory (Memory+): both projections ~ N(0, 1/D); the gate's bias 0.
            nn.init.normal_(layer.gate_proj.weight, mean=0.0, std=layer.dim**-0.5)
            nn.init.zeros_(layer.gate_proj.bias)
            nn.init.normal_(layer.out_proj.weight, mean=0.0, std=layer.dim**-0.5)

    @classmethod
    def output(cls, layer: Any, x_ND: Tensor, out_NV: Tensor) -> Tensor:
        """`(N, V)` read -> `(N, D)`: out_proj(read * act(gate_proj(x))) (section 3.3)."""
        gate_NV = GATES[layer.gate](layer.gate_proj(x_ND))
        return layer.out_proj(out_NV.to(gate_NV.dtype) * gate_NV)
