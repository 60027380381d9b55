"""The memory slots of a model as finetuning sees them: one entry per pool of value tables.

A memory layer reads value rows by slot id from its `ValueTables` (the values, and for PEER the
down vectors: the same slot ids index both); a pool is one layer's own tables or the Transformer's
shared pool (`model.memory.share_values`) that several layers read. Slot statistics and row
selections are kept per pool: a slot is one row of each of its tables however many layers read it.
Pools are named by their values table's module name (`Transformer.value_tables()`:
`blocks.1.memory.values`, `shared_values`), stable across runs of the same model config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from pkmlm.metrics.memory_usage import unwrap_model


@dataclass
class SlotPool:
    name: str  # module name of the pool's values table
    tables: dict[str, nn.Module]  # module name -> table (values, and PEER's down), rows = slots
    layers: dict[int, nn.Module] = field(default_factory=dict)  # transformer layer index -> memory

    @property
    def n_slots(self) -> int:
        return next(iter(self.tables.values())).weight.shape[0]

    @property
    def weights(self) -> list[nn.Parameter]:
        return [table.weight for table in self.tables.values()]

    @property
    def device(self):
        return next(iter(self.tables.values())).weight.device


def slot_pools(model: nn.Module) -> dict[str, SlotPool]:
    """{name: SlotPool} of every memory slot pool, in layer order (DDP/compile wrappers looked through)."""
    inner = unwrap_model(model)
    names = {id(table): name for name, table in inner.value_tables().items()}
    pools: dict[str, SlotPool] = {}
    for i in sorted(inner.memory_layers()):
        tables = [t for t in inner.tables_of(i) if t is not None]
        name = names[id(tables[0])]
        pool = pools.setdefault(name, SlotPool(name, {names[id(t)]: t for t in tables}))
        pool.layers[i] = inner.memory_layers()[i]
    return pools


def slot_ids(indices_NHK: Tensor) -> Tensor:
    """The slot ids of one observed read, flattened to int64 `(R,)`."""
    return indices_NHK.reshape(-1).long()
