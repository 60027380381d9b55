"""The contract of a memory variant: what a variant module gives the 2019 layer and the code around it.

A variant is a class registered under its `kind` (`pkmlm.model.variants.register`). It owns:

  Fields        a dataclass of its `model.memory.*` options, every default "off" (the 2019 layer).
                `MemoryConfig` inherits the Fields of every registered variant, so presets, CLI
                overrides and saved configs keep one flat `model.memory` group.
  check         its options' checks (called by `MemoryConfig.validate`, the config boundary),
  check_layers  and those that need `model.n_layers` (a side layer's indices).
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

A variant whose layer is not a product-key memory (Engram's hashed n-gram tables: variants/engram.py)
builds a module that sits *beside* a block instead of hooking into `ProductKeyMemory`:

  side_name     the attribute the block holds it under (`blocks.<i>.<side_name>`); "" (the
                default) for a variant that hooks into the product-key layer. Its options are
                then not `ProductKeyMemory` arguments (`registry.layer_option_defaults`).
  side_layers(memory) -> [layer indices]   the transformer layers that get one (from its options)
  build_side(cfg, layer) -> SideLayer      built by `Block` (cfg: the `ModelConfig`) from the
                config alone, so that every place that builds a model (train, eval, export,
                inspect, harness, generate) builds the same one; what depends on the run's
                tokenizer is installed afterwards (`SideLayer.adapt_to_tokenizer`) into persistent
                buffers, which checkpoints carry.

The module is a `SideLayer` (below): `Block` calls it before its attention with the residual stream
and the token ids and adds its output to the residual stream; the code around the model reaches it
through `Transformer.side_layers()` and this protocol, never by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

from torch import Tensor, nn


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
    # A module beside the block instead of hooks into the product-key layer (module docstring)
    side_name: ClassVar[str] = ""

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
    def check_layers(cls, memory: Any, prefix: str, n_layers: int) -> None:
        """Raise `ConfigError` when its options name a layer outside [0, n_layers) (side layers)."""

    @classmethod
    def down_dim(cls, memory: Any, dim: int) -> Optional[int]:
        return None

    @classmethod
    def side_layers(cls, memory: Any) -> List[int]:
        """The transformer layers that get this variant's `SideLayer` (none without `side_name`)."""
        return []

    @classmethod
    def build_side(cls, cfg: Any, layer: int) -> "SideLayer":
        """The `SideLayer` of transformer layer `layer`, from the `ModelConfig` `cfg` alone."""
        raise NotImplementedError(f"memory variant {cls.kind!r} builds no module beside a block")

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


class SideLayer(nn.Module):
    """A module a variant builds beside a block (`MemoryVariant.side_name`): what `Block`,
    `Transformer` and the code around the model (optimizer groups, counts, metrics, decoding,
    inspection, training setup) need of it. A subclass implements every method.

    forward(h_BTD, idx_BT) -> (B, T, D)   the residual stream entering the block and the raw token
                          ids; the block adds the output to the residual stream before its attention
    reset_parameters(residual_std)        its own init; `residual_std` is the Transformer's std of
                          projections into the residual stream (0.02 / sqrt(2 n_layers))
    table_parameters()    its sparse tables: the optimizer puts them in their own group
                          (`optim.lr x tables_lr_mult`, no weight decay; lazy row-sparse Adam with
                          `optim.sparse_values`, for which it gives the rows read sparse gradients
                          when `sparse_grad` is set)
    count_parameters()    {"total", "tables", "active"}: all its parameters, its tables', and what
                          one token touches (dense parameters + the table entries it reads)
    flops_per_token()     training FLOPs per token (6 x multiply-adds, `Transformer.flops_per_token`)
    observer, usage_groups(), gate_name   usage metrics: every full forward calls
                          `observer(rows_BTR, gate_BT)` when set (the flat table rows read, and one
                          scalar per token, e.g. a gate); `usage_groups()` lists the table's row
                          groups in order as `(name, rows)`, e.g. `("order2", 36864)`: the tracker
                          (pkmlm/metrics/table_usage.py) gives usage, KL to uniform and Gini over
                          all rows and per group, and the scalar's mean as `<gate_name>_mean`, logged
                          as `memory/layer{i}/<side_name>/<stat>`
    new_decode_state(batch), decode(h_BTD, idx_BT, state, valid_BT)   incremental decoding:
                          `Transformer.new_cache` keeps one state per side layer in the `KVCache`
                          (`state.keep(rows)` as `KVCache.keep`)
    adapt_to_tokenizer(tok, eot_id, directory, write)   install what depends on the run's
                          tokenizer (persistent buffers), from a file in `directory` when there is
                          one (refused in one line, a `DataError`, when it does not fit `tok`), else
                          built and, with `write`, saved there (the trainer, rank 0)
    describe_reads(idx_BT, decode, top) -> [lines]   for `pkmlm-inspect`: what the layer reads on a
                          token sample, `decode(ids) -> str` the run's tokenizer
    """

    tables_lr_mult: float = 1.0
    gate_name: str = "gate"
    sparse_grad: bool = False
    observer: Optional[Callable[[Tensor, Tensor], None]] = None

    def table_parameters(self) -> List[nn.Parameter]:
        raise NotImplementedError

    def count_parameters(self) -> Dict[str, int]:
        raise NotImplementedError

    def flops_per_token(self) -> float:
        raise NotImplementedError

    def reset_parameters(self, residual_std: Optional[float] = None) -> None:
        raise NotImplementedError

    def usage_groups(self) -> List[Tuple[str, int]]:
        raise NotImplementedError

    def new_decode_state(self, batch: int) -> Any:
        raise NotImplementedError

    def decode(self, h_BTD: Tensor, idx_BT: Tensor, state: Any, valid_BT: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def adapt_to_tokenizer(self, tok: Any, eot_id: int, directory: str, write: bool) -> None:
        raise NotImplementedError

    def describe_reads(self, idx_BT: Tensor, decode: Callable[[List[int]], str], top: int = 10) -> List[str]:
        raise NotImplementedError
