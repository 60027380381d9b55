"""How a side layer (`pkmlm.model.variants.SideLayer`, e.g. Engram's hashed n-gram tables) spreads
its reads over its table rows, and the mean of the per-token scalar it reports (Engram's gate).

A side layer reads R rows per token from one table whose rows come in named groups
(`layer.usage_groups()`: Engram's n-gram orders, each the H prime-sized tables of its heads). Over
an evaluation set, per layer:

- **usage** = fraction of rows read at least once, over all rows and per group;
- **KL to uniform** (nats) and **Gini** of the read counts, over all rows and per group: the same
  pure functions as a product-key memory's metrics (metrics/memory_usage.py), so the numbers
  compare. With uniform hashing, a skewed count means skewed n-grams (text is Zipfian), not a bad
  hash;
- **<gate_name>_mean** = the mean of the scalar over the tokens read (Engram: `gate_mean`, how much
  of the memory the context lets into the residual stream).

`TableUsage` is the layer's `observer` (`layer.observer = tracker`): it accumulates on the layer's
device with no host synchronisation per batch; `compute` copies to the host once.
`track_side_usage` attaches one to every side layer of a model for an evaluation pass; the keys are
`memory/layer{i}/<side_name>/<stat>` (`side_metrics`), beside the product-key memory's
`memory/layer{i}/<stat>` of the same layer. During training, `SideUsageWindow` keeps one on every
side layer and the loop logs the reads of the steps since its last training row as
`train/memory/layer{i}/<side_name>/<stat>`, then starts a new window.

Shape legend: B batch, T sequence length, R rows read per token, S rows of the whole table.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping

import torch
from torch import Tensor

from pkmlm.metrics.memory_usage import gini, kl_to_uniform, unwrap_model, usage_fraction

__all__ = ["SideUsageWindow", "TableUsage", "side_metrics", "side_observers_set_aside", "track_side_usage"]


class TableUsage:
    """Read counts of every row of one side layer's table, by group, and the sum of its scalar.

    `groups`: `(name, rows)` in the table's row order; the layer calls `tracker(rows_BTR, gate_BT)`.
    """

    def __init__(self, groups: list[tuple[str, int]], gate_name: str, device: torch.device | str | None = None):
        if not groups or min(rows for _, rows in groups) <= 0:
            raise ValueError(f"groups {groups} must be a non-empty list of (name, rows > 0)")
        self.groups = [(str(name), int(rows)) for name, rows in groups]
        self.gate_name = gate_name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count_S = torch.zeros(sum(rows for _, rows in self.groups), dtype=torch.int64, device=self.device)
        self.gate_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=self.device)

    @classmethod
    def of(cls, layer) -> "TableUsage":
        """A tracker sized for `layer` (a `SideLayer`), on its device."""
        device = next(iter(layer.table_parameters())).device
        return cls(layer.usage_groups(), layer.gate_name, device)

    def reset(self) -> None:
        self.count_S.zero_()
        self.gate_sum.zero_()
        self.tokens.zero_()

    @torch.no_grad()
    def update(self, rows_BTR: Tensor, gate_BT: Tensor) -> None:
        """Add one batch: the flat row ids read `(..., R)` and the scalar `(...)` of the same tokens."""
        rows = rows_BTR.reshape(-1).to(self.device, torch.int64)
        # index_add_ rather than bincount: bincount sizes its output from max(ids), a host sync.
        self.count_S.index_add_(0, rows, torch.ones_like(rows))
        self.gate_sum += gate_BT.detach().to(self.device, torch.float64).sum()
        self.tokens += gate_BT.numel()

    __call__ = update

    def all_reduce_(self, group=None) -> None:
        """Sum the counts over the ranks of `group` (no-op outside torch.distributed)."""
        import torch.distributed as dist  # only needed by distributed callers

        if dist.is_available() and dist.is_initialized():
            for t in (self.count_S, self.gate_sum, self.tokens):
                dist.all_reduce(t, group=group)

    def compute(self) -> dict[str, float]:
        """Plain floats: `usage`, `kl_count`, `gini` over all rows; the same three as `<group>/...`
        for each group; `<gate_name>_mean` (NaN before any update)."""
        count_S = self.count_S.cpu()
        stats = {"usage": usage_fraction(count_S), "kl_count": kl_to_uniform(count_S), "gini": gini(count_S)}
        start = 0
        for name, rows in self.groups:
            part_S = count_S[start : start + rows]
            stats[f"{name}/usage"] = usage_fraction(part_S)
            stats[f"{name}/kl_count"] = kl_to_uniform(part_S)
            stats[f"{name}/gini"] = gini(part_S)
            start += rows
        tokens = int(self.tokens.item())
        stats[f"{self.gate_name}_mean"] = float(self.gate_sum.item()) / tokens if tokens else math.nan
        return stats

    def __repr__(self) -> str:
        return f"TableUsage(rows={self.count_S.numel()}, groups={[name for name, _ in self.groups]})"


def _side_layers(model: torch.nn.Module) -> dict:
    """`model.side_layers()` through DDP and compile wrappers ({} for a model without them)."""
    try:
        inner = unwrap_model(model)
    except TypeError:
        return {}
    return dict(inner.side_layers()) if hasattr(inner, "side_layers") else {}


def _metric_prefix(name: str) -> str:
    """`blocks.1.engram` -> `memory/layer1/engram`."""
    _, layer, side = name.split(".", 2)
    return f"memory/layer{layer}/{side}"


@contextlib.contextmanager
def track_side_usage(model: torch.nn.Module) -> Iterator[dict[str, TableUsage]]:
    """`with track_side_usage(model) as trackers:` a fresh tracker as every side layer's observer,
    keyed by metric prefix; the observers they had are put back on the way out (also on an
    exception)."""
    layers = {_metric_prefix(name): layer for name, layer in _side_layers(model).items()}
    saved = {prefix: layer.observer for prefix, layer in layers.items()}
    trackers = {prefix: TableUsage.of(layer) for prefix, layer in layers.items()}
    for prefix, layer in layers.items():
        layer.observer = trackers[prefix]
    try:
        yield trackers
    finally:
        for prefix, layer in layers.items():
            layer.observer = saved[prefix]


def side_metrics(trackers: Mapping[str, TableUsage]) -> dict[str, float]:
    """The trackers' statistics as `memory/layer{i}/<side_name>/<stat>` keys."""
    return {
        f"{prefix}/{key}": value for prefix in sorted(trackers) for key, value in trackers[prefix].compute().items()
    }


@contextlib.contextmanager
def side_observers_set_aside(model: torch.nn.Module) -> Iterator[None]:
    """Every side layer without its observer for the block (evaluation reads are not training
    reads), put back on the way out, also on an exception."""
    layers = _side_layers(model)
    saved = {name: layer.observer for name, layer in layers.items()}
    for layer in layers.values():
        layer.observer = None
    try:
        yield
    finally:
        for name, layer in layers.items():
            layer.observer = saved[name]


class SideUsageWindow:
    """The training reads of every side layer since the last training row: a `TableUsage` observer
    on each (attached at construction); `row()` gives `train/memory/layer{i}/<side_name>/<stat>`
    over all ranks and starts a new window. Empty (falsy) for a model without side layers."""

    def __init__(self, model: torch.nn.Module):
        layers = {_metric_prefix(name): layer for name, layer in _side_layers(model).items()}
        self.trackers = {prefix: TableUsage.of(layer) for prefix, layer in layers.items()}
        for prefix, layer in layers.items():
            layer.observer = self.trackers[prefix]

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def row(self) -> dict[str, float]:
        for tracker in self.trackers.values():
            tracker.all_reduce_()
        out = {f"train/{key}": value for key, value in side_metrics(self.trackers).items()}
        for tracker in self.trackers.values():
            tracker.reset()
        return out
