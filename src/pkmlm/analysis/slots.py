"""Two streaming passes over evaluation batches: slot read counts, then the contexts that read
chosen slots hardest.

Pass 1 (`count_reads`) attaches the evaluator's `MemoryUsage` trackers (per head, per slot counts
and softmax weights, on the device) and runs the model over the batches: O(heads x slots) memory
whatever the data size. From its counts the report picks the slots it shows (`pick_slots`: the
most-read ones and a seeded random sample). Pass 2 (`collect_contexts`) runs the batches again and
keeps, for each picked slot, the `per_slot` tokens that gave it the largest read weight (summed
over heads: the weight of that value row in the token's output), as (batch, row, position)
references into the batches: O(picked x per_slot) memory, a running top-k merged per batch on
the device.

A token's read at position t depends on tokens 0..t of its sequence only (causal attention; query
norms use running statistics in eval mode), so a context is the sequence prefix ending at t.

Shape legend: B sequences, T positions, N = B*T tokens, H heads, K knn, S slots, R picked slots,
C contexts kept per slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pkmlm.metrics.memory_usage import MemoryUsage, memory_layers_of, track_memory_usage


@dataclass
class LayerCounts:
    """Pass-1 result of one memory layer (host tensors)."""

    count_per_head: Tensor  # (H, S) int64: times head h selected slot s
    weight_per_head: Tensor  # (H, S) float64: softmax weight head h gave slot s
    stats: dict[str, float]  # MemoryUsage.compute(): usage, KL, gini, top-k mass, per head

    @property
    def count(self) -> Tensor:
        return self.count_per_head.sum(0)


@dataclass
class Context:
    batch: int  # index into the batches
    row: int  # sequence in that batch
    position: int  # the triggering token's position in the sequence (inputs, 0-based)
    weight: float  # read weight of the slot at that token, summed over heads


@dataclass
class SlotContexts:
    slot: int
    reads: int  # pass-1 count over all heads
    contexts: list[Context]  # heaviest first; fewer than asked when the slot was read less


def _inputs(batch_BT1: Tensor) -> Tensor:
    return batch_BT1[:, :-1]


@torch.no_grad()
def count_reads(
    model: nn.Module,
    batches: Sequence[Tensor],
    device: torch.device | str,
    progress: Callable[[Sequence[Tensor]], Sequence[Tensor]] = lambda b: b,
) -> dict[int, LayerCounts]:
    """Pass 1: {layer: LayerCounts} over every batch (`(B, T+1)` int64, inputs `b[:, :-1]`).

    The model's mode and observers are restored afterwards (`track_memory_usage`)."""
    was_training = model.training
    model.eval()
    try:
        with track_memory_usage(model) as trackers:
            for batch_BT1 in progress(batches):
                model(_inputs(batch_BT1).to(device, non_blocking=True))
            return {i: _layer_counts(t) for i, t in trackers.items()}
    finally:
        model.train(was_training)


def _layer_counts(tracker: MemoryUsage) -> LayerCounts:
    return LayerCounts(tracker.count_per_head.cpu(), tracker.weight_per_head.cpu(), tracker.compute())


def pick_slots(count_S: Tensor, top: int, random: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """The `top` most-read slots (most first; only slots read at least once) and `random` others
    drawn uniformly without replacement from all the remaining slots (ascending; seeded)."""
    order = torch.argsort(count_S, descending=True, stable=True)
    most = [int(s) for s in order[:top] if count_S[s] > 0]
    rest = torch.ones(count_S.numel(), dtype=torch.bool)
    rest[most] = False
    pool = rest.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    drawn = pool[torch.randperm(pool.numel(), generator=gen)[:random]]
    return most, sorted(int(s) for s in drawn)


class _TopContexts:
    """Observer: for R chosen slots, the C (batch, token) pairs that read each one with the most weight."""

    def __init__(self, slots: Sequence[int], n_slots: int, per_slot: int, device: torch.device):
        self.n_picked, self.per_slot = len(slots), per_slot
        # slot id -> its column among the picked slots, or -1 (S,): one gather per read, no search.
        self.column_S = torch.full((n_slots,), -1, dtype=torch.int64, device=device)
        self.column_S[torch.tensor(list(slots), dtype=torch.int64, device=device)] = torch.arange(
            len(slots), device=device
        )
        self.weight_CR = torch.zeros(per_slot, self.n_picked, dtype=torch.float64, device=device)
        self.where_CR = torch.full((per_slot, self.n_picked), -1, dtype=torch.int64, device=device)
        self.batch_offset = 0  # global token index of this batch's first token

    def __call__(self, indices_NHK: Tensor, weights_NHK: Tensor) -> None:
        n_tokens, n_picked = indices_NHK.shape[0], self.n_picked
        column_NHK = self.column_S[indices_NHK]
        hit_NHK = column_NHK >= 0
        # Weight of each picked slot at each token, summed over heads and ranks: a dense (N, R).
        key = torch.arange(n_tokens, device=column_NHK.device).view(-1, 1, 1) * n_picked + column_NHK.clamp_min(0)
        weight_NR = torch.zeros(n_tokens * n_picked, dtype=torch.float64, device=column_NHK.device)
        weight_NR.index_add_(0, key.reshape(-1), (weights_NHK.double() * hit_NHK).reshape(-1))
        weight_NR = weight_NR.view(n_tokens, n_picked)
        # Merge this batch's best C per slot with the kept ones: top-C of 2C candidates.
        k = min(self.per_slot, n_tokens)
        best_CR = weight_NR.topk(k, dim=0)
        where_CR = best_CR.indices + self.batch_offset
        weight_2CR = torch.cat([self.weight_CR, best_CR.values])
        where_2CR = torch.cat([self.where_CR, where_CR])
        keep_CR = weight_2CR.topk(self.per_slot, dim=0).indices
        self.weight_CR = weight_2CR.gather(0, keep_CR)
        self.where_CR = where_2CR.gather(0, keep_CR)


@torch.no_grad()
def collect_contexts(
    model: nn.Module,
    batches: Sequence[Tensor],
    slots: dict[int, list[int]],
    per_slot: int,
    device: torch.device | str,
    reads: dict[int, Tensor] | None = None,
    progress: Callable[[Sequence[Tensor]], Sequence[Tensor]] = lambda b: b,
) -> dict[int, list[SlotContexts]]:
    """Pass 2: {layer: [SlotContexts per slot of `slots[layer]`]}, the `per_slot` heaviest reads of
    each slot over `batches` (same batches and order as pass 1). `reads`: pass-1 counts per layer
    (S,), copied into the result. Observers and mode are restored afterwards."""
    layers = memory_layers_of(model)
    saved = {i: memory.observer for i, memory in layers.items()}
    was_training = model.training
    model.eval()
    observers = {
        i: _TopContexts(slots[i], layers[i].n_keys ** 2, per_slot, torch.device(device)) for i in slots if slots[i]
    }
    starts = []  # global index of each batch's first token, and its (B, T)
    try:
        for i, memory in layers.items():
            memory.observer = observers.get(i)
        offset = 0
        for batch_BT1 in progress(batches):
            inputs_BT = _inputs(batch_BT1)
            starts.append((offset, inputs_BT.shape[1]))
            for observer in observers.values():
                observer.batch_offset = offset
            model(inputs_BT.to(device, non_blocking=True))
            offset += inputs_BT.numel()
    finally:
        for i, memory in layers.items():
            memory.observer = saved[i]
        model.train(was_training)
    out: dict[int, list[SlotContexts]] = {}
    for i, observer in observers.items():
        weight_CR, where_CR = observer.weight_CR.cpu(), observer.where_CR.cpu()
        out[i] = []
        for r, slot in enumerate(slots[i]):
            contexts = [
                _locate(int(where_CR[c, r]), float(weight_CR[c, r]), starts)
                for c in range(per_slot)
                if weight_CR[c, r] > 0
            ]
            count = int(reads[i][slot]) if reads is not None else -1
            out[i].append(SlotContexts(slot, count, contexts))
    return out


def _locate(token: int, weight: float, starts: list[tuple[int, int]]) -> Context:
    """A global token index back to (batch, row, position)."""
    for b, (offset, seq) in reversed(list(enumerate(starts))):
        if token >= offset:
            row, position = divmod(token - offset, seq)
            return Context(b, row, position, weight)
    raise ValueError(f"token {token} before the first batch")
