"""Product-key memory as the 2019 paper builds it (Lample et al., NeurIPS 2019, "Large Memory Layers
with Product Keys"): the layer every other variant extends. Its code is pkmlm/model/memory.py
(`ProductKeyMemory`, `MemoryConfig`'s own fields and `check_memory_args`), which the other variants
hook into; this module registers it, so that a run with memory layers and no variant's options on
is named "PKM" and `model.memory.kind=pkm` is a registered name.
"""

from __future__ import annotations

from typing import Any

from pkmlm.model.variants.base import MemoryVariant
from pkmlm.model.variants.registry import register


@register
class PKM(MemoryVariant):
    kind = "pkm"
    display_name = "PKM"
    precedence = 0  # the fallback: named only when no other variant describes the options
    example = {}
    in_hf_export = True  # checkpoint/modeling_pkmlm.py mirrors it (tests/e2e/test_hf_export.py)

    @classmethod
    def describes(cls, memory: Any) -> bool:
        return True
