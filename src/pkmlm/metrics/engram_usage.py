"""How an Engram layer (model/engram.py) spreads its reads over its hashed table rows, and how much
its gate lets through.

An Engram layer reads R = (N - 1) * H rows per token, H heads for each n-gram order 2..N, each head
its own prime-sized part of one table. Over an evaluation set, per layer:

- **usage** = fraction of rows read at least once, per order (over that order's H tables
  together) and over all orders;
- **KL to uniform** (nats) and **Gini** of the read counts, per order and overall: the same pure
  functions as a product-key memory's metrics (metrics/memory_usage.py), so the numbers compare.
  With uniform hashing, a skewed count means skewed n-grams (text is Zipfian), not a bad hash;
- **gate_mean** = mean of the gate alpha_t over the tokens read: how much of the memory the
  context lets into the residual stream.

`EngramUsage` is the layer's `observer` (`layer.observer = tracker`): it accumulates on the layer's
device with no host synchronisation per batch; `compute` copies to the host once.

Shape legend: B batch, T sequence length, R rows read per token, S rows of the whole table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pkmlm.metrics.memory_usage import gini, kl_to_uniform, usage_fraction

__all__ = ["EngramUsage"]


class EngramUsage:
    """Read counts of every row of one Engram layer's tables and the sum of its gate values.

    `sizes`: the rows of each head's table in the layer's order (order-major, `layer.sizes`);
    `heads`: hash heads per order. The layer calls `tracker(rows_BTR, gate_BT)`.
    """

    def __init__(self, sizes: list[int], heads: int, device: torch.device | str | None = None):
        if heads <= 0 or not sizes or len(sizes) % heads or min(sizes) <= 0:
            raise ValueError(f"sizes {sizes} must be positive and come in groups of heads={heads}")
        self.sizes = [int(s) for s in sizes]
        self.heads = int(heads)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count_S = torch.zeros(sum(self.sizes), dtype=torch.int64, device=self.device)
        self.gate_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=self.device)

    @classmethod
    def of(cls, layer) -> "EngramUsage":
        """A tracker sized for `layer` (an `EngramLayer`), on its device."""
        return cls(layer.sizes.tolist(), layer.heads, layer.tables.weight.device)

    def reset(self) -> None:
        self.count_S.zero_()
        self.gate_sum.zero_()
        self.tokens.zero_()

    @torch.no_grad()
    def update(self, rows_BTR: Tensor, gate_BT: Tensor) -> None:
        """Add one batch: the flat row ids read `(..., R)` and the gate `(...)` of the same tokens."""
        rows = rows_BTR.reshape(-1).to(self.device, torch.int64)
        # index_add_ rather than bincount: bincount sizes its output from max(ids), a host sync.
        self.count_S.index_add_(0, rows, torch.ones_like(rows))
        self.gate_sum += gate_BT.detach().to(self.device, torch.float64).sum()
        self.tokens += gate_BT.numel()

    __call__ = update

    def compute(self) -> dict[str, float]:
        """Plain floats: `usage`, `kl_count`, `gini` over all rows; the same three as `order{n}/...`
        for each n-gram order n; `gate_mean` (NaN before any update)."""
        count_S = self.count_S.cpu()
        stats = {"usage": usage_fraction(count_S), "kl_count": kl_to_uniform(count_S), "gini": gini(count_S)}
        start = 0
        for order, first in enumerate(range(0, len(self.sizes), self.heads), start=2):
            rows = sum(self.sizes[first : first + self.heads])
            part_S = count_S[start : start + rows]
            stats[f"order{order}/usage"] = usage_fraction(part_S)
            stats[f"order{order}/kl_count"] = kl_to_uniform(part_S)
            stats[f"order{order}/gini"] = gini(part_S)
            start += rows
        tokens = int(self.tokens.item())
        stats["gate_mean"] = float(self.gate_sum.item()) / tokens if tokens else math.nan
        return stats

    def __repr__(self) -> str:
        return f"EngramUsage(rows={sum(self.sizes)}, heads={self.heads}, orders={len(self.sizes) // self.heads})"
