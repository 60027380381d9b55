"""The registry of memory variants (the contract and the recipe: this package's docstring)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Type

from pkmlm.errors import require
from pkmlm.model.variants.base import MemoryVariant, option

_REGISTRY: Dict[str, Type[MemoryVariant]] = {}


def register(variant: Type[MemoryVariant]) -> Type[MemoryVariant]:
    """Register `variant` under its `kind` (a decorator). A kind registers once."""
    if not variant.kind or variant.kind in _REGISTRY:
        raise ValueError(f"memory variant kind {variant.kind!r} is empty or already registered")
    _REGISTRY[variant.kind] = variant
    return variant


def unregister(kind: str) -> None:
    """Remove a kind (tests that register a variant of their own clean up with it)."""
    _REGISTRY.pop(kind)


def registered() -> List[Type[MemoryVariant]]:
    """Every registered variant, in registration order (the order their hooks run)."""
    return list(_REGISTRY.values())


def get(kind: str) -> Type[MemoryVariant]:
    """The variant registered as `kind` (KeyError naming the registered kinds otherwise)."""
    if kind not in _REGISTRY:
        raise KeyError(f"no memory variant {kind!r}; registered: {'|'.join(_REGISTRY)}")
    return _REGISTRY[kind]


def field_classes() -> List[type]:
    """The `Fields` dataclasses of every registered variant (`MemoryConfig`'s bases)."""
    return [v.Fields for v in registered()]


def option_defaults() -> Dict[str, Any]:
    """Every variant option and its default (off)."""
    out: Dict[str, Any] = {}
    for cls in field_classes():
        for f in dataclasses.fields(cls):
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


def side_variants() -> List[Type[MemoryVariant]]:
    """The variants that build a module beside a block (`side_name` set), in registration order."""
    return [v for v in registered() if v.side_name]


def layer_option_defaults() -> Dict[str, Any]:
    """The options of the variants that hook into `ProductKeyMemory` (its arguments) and their
    defaults: every variant's but those of the variants that build a side layer."""
    side = {f.name for v in side_variants() for f in dataclasses.fields(v.Fields)}
    return {name: value for name, value in option_defaults().items() if name not in side}


def layer_options(given: Dict[str, Any]) -> Dict[str, Any]:
    """`given` `ProductKeyMemory` options with the defaults of the rest; TypeError on a name no
    variant hooking into it owns."""
    defaults = layer_option_defaults()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise TypeError(f"unknown memory option(s) {unknown}; the registered variants' options: {sorted(defaults)}")
    return {**defaults, **given}


def options_in_use(memory: Any, variant: Type[MemoryVariant]) -> List[str]:
    """The options of `variant` that a config (object or dict) sets away from their defaults."""
    out = []
    for f in dataclasses.fields(variant.Fields):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if option(memory, f.name, default) != default:
            out.append(f.name)
    return out


def not_in_hf_export(memory: Any) -> List[str]:
    """`kind: option` for each option in use whose variant the standalone HF file lacks (`in_hf_export`)."""
    return [f"{v.kind}: {name}" for v in registered() if not v.in_hf_export for name in options_in_use(memory, v)]


def variant_of(memory: Any) -> Type[MemoryVariant]:
    """The variant that names a config's options (a config object or a saved config's dict): the
    describing variant of highest precedence."""
    describing = [v for v in registered() if v.describes(memory)]
    return max(describing, key=lambda v: v.precedence)


def kind_of(memory: Any) -> str:
    return variant_of(memory).kind


def label_of(memory: Any) -> str:
    """The run's variant as reports name it ("PKM", "Memory+", "PEER", "UltraMem-style", ...)."""
    return variant_of(memory).label(memory)


def details_of(memory: Any, extra: List[Tuple[int, str]]) -> List[str]:
    """What every registered variant lists about a config after its name, plus `extra`'s
    `(position, text)` pairs, in position order (a report's "(parallel, qk-norm, shared pool)")."""
    pairs = list(extra) + [d for v in registered() for d in v.details(memory)]
    return [text for _, text in sorted(pairs)]


def aux_names(layers: List[Any]) -> List[str]:
    """The names (`aux_name`) of the auxiliary losses built layers compute, sorted, each once."""
    return sorted({v.aux_name for layer in layers for v in layer.variants if v.has_aux(layer) and v.aux_name})


def check_kind(memory: Any, prefix: str) -> None:
    """`kind` null, or a registered kind that the options describe."""
    kind = option(memory, "kind")
    if kind is None:
        return
    require(kind in _REGISTRY, f"{prefix}.kind", kind, f"null or one of {'|'.join(_REGISTRY)}")
    named = kind_of(memory)
    require(
        kind == named,
        f"{prefix}.kind",
        kind,
        f"the options describe {named!r} (see that variant's options in configs/memory/); "
        "set kind to it, to null, or change the options",
    )


def down_table(memory: Any, dim: int) -> Optional[Tuple[str, int]]:
    """`(what, columns)` of the second per-slot table a config's layers read (PEER's down vectors):
    `what` names it for messages (`MemoryVariant.down_name`); None when no variant reads one."""
    for variant in registered():
        columns = variant.down_dim(memory, dim)
        if columns is not None:
            return variant.down_name, columns
    return None


def down_dim(memory: Any, dim: int) -> Optional[int]:
    """Columns of the second per-slot table a config's layers read, or None."""
    table = down_table(memory, dim)
    return None if table is None else table[1]
