"""The memory variants as registered types, and the registry that maps `model.memory.kind` to them.

Each variant is one module here holding one `MemoryVariant` subclass (the contract: base.py's
docstring): its options as a dataclass (`Fields`), their checks, the submodules and forward hooks it
adds to the 2019 layer (`pkmlm.model.memory.ProductKeyMemory`), its parameter and FLOP counts, and
its name. Nothing outside a variant's module tests for that variant by name: the layer, the model,
FLOP counts, sharding and reports ask the registry.

  pkm.py          the 2019 layer (Lample et al. 2019), code in ../memory.py          kind "pkm"
  peer.py         PEER single-neuron experts (He 2024)                             kind "peer"
  memory_plus.py  Memory+'s gated read (Berges et al. 2024)                        kind "memory_plus"
  ultramem.py     UltraMem's qk norm and UltraMemV2's balance loss (Huang et al.)  kind "ultramem"
  engram.py       Engram's hashed n-gram tables beside a block (Cheng et al. 2026)  kind "engram"

Options of several variants combine (an UltraMem-style run is PEER's values plus UltraMem's
balance loss and qk norm); the run's name (`kind_of`, `label_of`) is that of the describing variant
with the highest `precedence`. `model.memory.kind` may state it: null (the default, and what every
config saved before the registry has) lets the options name it; a set kind must be registered and
must be the one the options describe.

Adding a variant (docs/architecture.md, "How to add a memory variant"):
  1. a module here with a `MemoryVariant` subclass decorated with `@register` (its Fields, check,
     hooks, counts; options off by default, so that every existing config keeps its meaning);
  2. its module name in `VARIANT_MODULES` at the bottom of this file (the registry, and so
     `MemoryConfig`'s fields, is complete once this package is imported);
then a preset under configs/memory/ and its tests (tests/unit/test_variant_registry.py builds and counts
every registered kind from its `example`). Set `in_hf_export` only once
pkmlm/checkpoint/modeling_pkmlm.py implements it too (the one stated exception to "a variant lives
in its module": that file must stay standalone).

A layer that is not a product-key memory (Engram's hashed n-gram tables, which read the token ids)
is a variant too: it sets `side_name` and builds a `SideLayer` that `Block` holds beside its
attention and mixer (base.py: `side_layers`, `build_side`, the `SideLayer` protocol).
"""

from __future__ import annotations

import importlib

from pkmlm.model.variants.base import MemoryVariant, SideLayer, is_int, is_number, option
from pkmlm.model.variants.registry import (
    aux_names,
    check_kind,
    details_of,
    down_dim,
    down_table,
    field_classes,
    get,
    kind_of,
    label_of,
    layer_option_defaults,
    layer_options,
    not_in_hf_export,
    option_defaults,
    options_in_use,
    register,
    registered,
    side_variants,
    unregister,
    variant_of,
)

__all__ = [
    "MemoryVariant",
    "SideLayer",
    "aux_names",
    "check_kind",
    "details_of",
    "down_dim",
    "down_table",
    "field_classes",
    "get",
    "is_int",
    "is_number",
    "kind_of",
    "label_of",
    "layer_option_defaults",
    "layer_options",
    "not_in_hf_export",
    "option",
    "option_defaults",
    "options_in_use",
    "register",
    "registered",
    "side_variants",
    "unregister",
    "variant_of",
]

# The registered variants, in the order their hooks run: importing a module registers its variant
# (`@register`). A new variant: its module, and its name here.
VARIANT_MODULES = ("pkm", "peer", "memory_plus", "ultramem", "engram")
for _name in VARIANT_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
