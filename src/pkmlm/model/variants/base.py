"""The contract of a memory variant: what a variant module gives the 2019 layer and the code around it.

A variant is a class registered under its `kind` (`pkmlm.model.variants.register`). It owns:

  Fields        a dataclass of its `model.memory.*` options, every default "off" (the 2019 layer).
                `MemoryConfig` inherits the Fields of every registered variant, so presets, CLI
                overrides and saved configs keep one flat `model.memory` group.
  check         its options' checks (called by `MemoryConfig.validate`, the config boundary).
  describes     whether a config's options make a run "this variant" (reports, `kind`), and
  precedence    which of several describing variants names the run (highest first).
  example       options that make a config this variant (tests build every registered kind).
  label         the name a report prints (`display_name` unless the options make it another),
  details       and what it lists after it, e.g. "qk-norm", "balance 0.01".
  aux_name      the name its auxiliary loss is logged under (train/<aux_name>), "" for none.
  down_dim      the columns of a second per-slot table the variant reads (PEER's down vectors), or
                None: the model creates, shares, shards and counts that table like the values
                (`down_name` names it in messages).
  read_columns  columns of the tables one token reads per slot besides the values (params, FLOPs).
  macs          multiply-adds per token of what it adds to the layer, by part (metrics/flops.py).
  in_hf_export  whether checkpoint/modeling_pkmlm.py (standalone: it may not import pkmlm) has it.

and, for a built `ProductKeyMemory` (`layer`), hooks the layer calls at fixed points in paper
order, each a no-op / identity by default:

  build_query(layer)      after the query network, before the keys (parameter order is saved
                          in optimizer states: keep submodules in the order the layer had them)
  build_output(layer)     after the value tables; may set `layer.out_dim`
  reset_parameters(layer) after the values' init (RNG order: the 2019 layer first)
  query(layer, q_NHQ)     the queries before query dropout (UltraMem's qk norm)
  keys(layer, keys_H2SP)  the sub-keys before scoring
  aux_loss(layer, s1_NHS, s2_NHS, i_NHK, j_NHK) -> 0-d fp32   its weighted auxiliary loss, computed
                          only when `has_aux(layer)` and the caller asks (UltraMemV2's balance loss)
  slot_weights(layer, tables, x_ND, weights_NR, indices_NR) -> weights_NR   (PEER's act(x . u_i))
  output(layer, x_ND, out_NV) -> out_NV                                     (Memory+'s gate)

`build_*` run for every registered variant (so that each sets its attributes, None when off);
the forward hooks only for the variants whose options are on in that layer (`active`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from torch import Tensor


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def option(memory: Any, name: str, default: Any = None) -> Any:
    """`memory.name` for a config object or a layer, `memory[name]` for a dict (a saved config)."""
    if isinstance(memory, Mapping):
        return memory.get(name, default)
    return getattr(memory, name, default)


@dataclasses.dataclass
class NoFields:
    """A variant without options of its own."""


class MemoryVariant:
    """One memory variant (see the module docstring). Subclass, set the class attributes, override
    what the variant changes, and register the class with `pkmlm.model.variants.register`."""

    kind: ClassVar[str] = ""  # the registered name: model.memory.kind, the preset's name
    display_name: ClassVar[str] = ""  # its name in reports ("PEER")
    precedence: ClassVar[int] = 0  # among several describing variants, the highest names the run
    Fields: ClassVar[type] = NoFields
    # The options of a config that is this variant (`describes` holds): tests build every kind from it
    example: ClassVar[Dict[str, Any]] = {}
    # Whether the standalone Hugging Face file (pkmlm/checkpoint/modeling_pkmlm.py: torch +
    # transformers only, so it cannot import this package) implements this variant's options. Off
    # for a new variant until its forward is written there too: `pkmlm-export --format hf` then
    # refuses a model that uses its options.
    in_hf_export: ClassVar[bool] = False
    aux_name: ClassVar[str] = ""
    # What its second per-slot table is, for messages, followed by "=<columns> columns" (`down_dim`)
    down_name: ClassVar[str] = ""

    # --- config side (classmethods: they read a config object or a saved config's dict) ----------

    @classmethod
    def describes(cls, memory: Any) -> bool:
        """Whether the options make a run with memory layers this variant."""
        return False

    @classmethod
    def label(cls, memory: Any) -> str:
        return cls.display_name

    @classmethod
    def details(cls, memory: Any) -> List[Tuple[int, str]]:
        """What a report lists after the name, as `(position, text)`: the run's placement is at 0,
        a shared pool at 20 (`pkmlm.experiments.report.variant_name`)."""
        return []

    @classmethod
    def check(cls, memory: Any, prefix: str) -> None:
        """Raise `ConfigError` on the first bad option of this variant."""

    @classmethod
    def down_dim(cls, memory: Any, dim: int) -> Optional[int]:
        return None

    # --- the built layer ----------------------------------------------------------------------------

    @classmethod
    def active(cls, layer: Any) -> bool:
        """Whether the layer's options turn this variant's forward hooks on."""
        return False

    @classmethod
    def read_columns(cls, layer: Any) -> int:
        return 0

    @classmethod
    def macs(cls, layer: Any) -> Dict[str, int]:
        return {}

    @classmethod
    def build_query(cls, layer: Any) -> None:
        pass

    @classmethod
    def build_output(cls, layer: Any) -> None:
        pass

    @classmethod
    def reset_parameters(cls, layer: Any) -> None:
        pass

    @classmethod
    def query(cls, layer: Any, q_NHQ: Tensor) -> Tensor:
        return q_NHQ

    @classmethod
    def keys(cls, layer: Any, keys_H2SP: Tensor) -> Tensor:
        return keys_H2SP

    @classmethod
    def has_aux(cls, layer: Any) -> bool:
        return False

    @classmethod
    def aux_loss(cls, layer: Any, s1_NHS: Tensor, s2_NHS: Tensor, i_NHK: Tensor, j_NHK: Tensor) -> Optional[Tensor]:
        return None

    @classmethod
    def slot_weights(cls, layer: Any, tables: Any, x_ND: Tensor, weights_NR: Tensor, indices_NR: Tensor) -> Tensor:
        return weights_NR

    @classmethod
    def output(cls, layer: Any, x_ND: Tensor, out_NV: Tensor) -> Tensor:
        return out_NV
