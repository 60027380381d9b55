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

`most_read_rows` lists, on a token sample, the rows read most with the n-grams that hash to them,
and `collision_rates` measures the hashing itself (both for `pkmlm-inspect`): per order,
the fraction of the sample's distinct n-grams that share a head's row with another one (mean over
heads), and the fraction that share the rows of every head (nothing tells them apart).

`EngramUsage` is the layer's `observer` (`layer.observer = tracker`): it accumulates on the layer's
device with no host synchronisation per batch; `compute` copies to the host once.

Shape legend: B batch, T sequence length, R rows read per token, S rows of the whole table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pkmlm.metrics.memory_usage import gini, kl_to_uniform, usage_fraction
from pkmlm.model.engram import document_starts, suffix_ngrams

__all__ = ["EngramUsage", "collision_rates", "most_read_rows"]


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


def _shared(values: Tensor) -> Tensor:
    """`(U,)` bool: whether another entry (a row of a 2-D `values`) equals entry u."""
    _, inverse_U, counts = torch.unique(values, dim=0, return_inverse=True, return_counts=True)
    return counts[inverse_U] > 1


@torch.no_grad()
def collision_rates(layer, idx_BT: Tensor) -> dict[str, float]:
    """Hash collisions of `layer` (an `EngramLayer`) among the distinct n-grams of `idx_BT`.

    For each order n (`order{n}/...`): `collision` = the fraction of the distinct n-grams (of
    canonical ids, document padding included) whose row in a head also holds another distinct
    n-gram of the sample, averaged over the H heads; `full_collision` = the fraction that share
    their rows in all H heads with another n-gram. With uniform hashing into tables of S rows, M
    distinct n-grams collide in a head with probability about 1 - exp(-M / S).
    """
    start_BT = document_starts(idx_BT, layer.eot_id)
    grams_MN = suffix_ngrams(layer.canonical_ids[idx_BT], start_BT, layer.pad_id, layer.max_ngram).flatten(0, 1)
    rows_MR = layer.rows(idx_BT, start_BT).flatten(0, 1)
    stats = {}
    for n in range(2, layer.max_ngram + 1):
        # One representative per distinct n-gram: the hash is a function of the n-gram.
        _, inverse_M = torch.unique(grams_MN[:, :n], dim=0, return_inverse=True)
        first_U = torch.full((int(inverse_M.max()) + 1,), len(inverse_M), dtype=torch.int64)
        first_U.scatter_reduce_(0, inverse_M, torch.arange(len(inverse_M)), reduce="amin")
        heads = slice((n - 2) * layer.heads, (n - 1) * layer.heads)
        rows_UH = rows_MR[first_U, heads]
        shared_UH = torch.stack([_shared(rows_UH[:, h]) for h in range(layer.heads)], dim=1)
        stats[f"order{n}/collision"] = float(shared_UH.double().mean())
        stats[f"order{n}/full_collision"] = float(_shared(rows_UH).double().mean())
        stats[f"order{n}/ngrams"] = float(len(first_U))
    return stats


@torch.no_grad()
def most_read_rows(layer, idx_BT: Tensor, top: int = 10) -> list[dict]:
    """The `top` rows of `layer` (an `EngramLayer`) read most often on the sample `idx_BT`, most
    read first, each a dict: `row` (flat, into `layer.tables`), `order`, `head` (within the order),
    `reads`, and `ngrams`: the distinct n-grams that read it, most frequent first, each
    `(raw_ids, reads)` with `raw_ids` the first occurrence's raw token ids, oldest first, -1 for
    a position before the document start (decode them with the run's tokenizer). Several n-grams
    on one row are collisions, or n-grams equal after compression (they show with different raw
    ids but share one entry: compare their canonical ids)."""
    start_BT = document_starts(idx_BT, layer.eot_id)
    canon_MN = suffix_ngrams(layer.canonical_ids[idx_BT], start_BT, layer.pad_id, layer.max_ngram).flatten(0, 1)
    raw_MN = suffix_ngrams(idx_BT, start_BT, -1, layer.max_ngram).flatten(0, 1)
    rows_MR = layer.rows(idx_BT, start_BT).flatten(0, 1)
    count_S = torch.zeros(layer.tables.num_embeddings, dtype=torch.int64, device=rows_MR.device)
    count_S.index_add_(0, rows_MR.reshape(-1), torch.ones_like(rows_MR.reshape(-1)))
    reads, rows = count_S.topk(min(top, count_S.numel()))
    out = []
    for count, row in zip(reads.tolist(), rows.tolist()):
        if count == 0:
            break
        r = int(torch.searchsorted(layer.offsets, torch.tensor(row), right=True)) - 1  # its head column
        order, head = 2 + r // layer.heads, r % layer.heads
        found: dict[tuple, list] = {}  # canonical n-gram -> [first raw ids, reads]
        for m in (rows_MR[:, r] == row).nonzero().flatten().tolist():
            key = tuple(canon_MN[m, :order].tolist())
            entry = found.setdefault(key, [tuple(reversed(raw_MN[m, :order].tolist())), 0])
            entry[1] += 1
        ngrams = sorted(((raw, n) for raw, n in found.values()), key=lambda x: -x[1])
        out.append({"row": row, "order": order, "head": head, "reads": count, "ngrams": ngrams})
    return out
