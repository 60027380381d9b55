"""Background slot statistics for sparse memory finetuning: how often pretraining data reads each slot.

Lin et al. 2025 (arXiv 2510.15103) rank a batch's slots by TF-IDF against a background sample of
the pretraining data (their 1,000 batches of DCLM): a slot's *document frequency* is the number of
background batches that read it at least once. `count_background` runs the model (eval mode, no
gradient) over those batches and counts, per slot pool (`tables.py`):

- ``batches_with_slot`` (S,) int64: background batches in which the slot was read (the IDF's df);
- ``reads`` (S,) int64: reads of the slot over all of them (reported, and useful for inspection).

Computed once per finetuning run and cached in its run directory as safetensors (tensors only, no
pickle) with the batch count and a caller-given fingerprint (which checkpoint, which data, which
batch size) in its metadata; a cache whose fingerprint, pools or shapes differ is recomputed. The
counts are also a Stateful piece of the run (`state_dict`), saved in its checkpoints: a resume
reads them from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pkmlm.finetune.tables import slot_ids, slot_pools
from pkmlm.metrics.memory_usage import memory_layers_of

BACKGROUND_FILE = "finetune_background.safetensors"


@dataclass
class BackgroundCounts:
    num_batches: int
    batches_with_slot: dict[str, Tensor]  # pool name -> (S,) int64
    reads: dict[str, Tensor]  # pool name -> (S,) int64

    def to(self, device: torch.device | str) -> BackgroundCounts:
        return BackgroundCounts(
            self.num_batches,
            {k: v.to(device) for k, v in self.batches_with_slot.items()},
            {k: v.to(device) for k, v in self.reads.items()},
        )

    @classmethod
    def zeros(cls, tables: Mapping[str, int], device: torch.device | str) -> BackgroundCounts:
        """Counts of no batch for the pools `tables` ({name: n_slots}): a template `load_state_dict` fills."""
        empty = {n: torch.zeros(s, dtype=torch.int64, device=device) for n, s in tables.items()}
        return cls(0, empty, {n: t.clone() for n, t in empty.items()})

    def state_dict(self) -> dict[str, Any]:
        """As checkpoint tensors (a Stateful piece of a finetuning run: train/states.py)."""
        return {
            "num_batches": torch.tensor(self.num_batches, dtype=torch.int64),
            "batches_with_slot": dict(self.batches_with_slot),
            "reads": dict(self.reads),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """In place (the tensors keep their devices)."""
        self.num_batches = int(state["num_batches"])
        for name, t in self.batches_with_slot.items():
            t.copy_(state["batches_with_slot"][name])
        for name, t in self.reads.items():
            t.copy_(state["reads"][name])


class _PoolCounter:
    """Observer of every layer reading one pool: marks the slots read in the current batch."""

    def __init__(self, n_slots: int, device: torch.device):
        self.present = torch.zeros(n_slots, dtype=torch.bool, device=device)
        self.batches_with_slot = torch.zeros(n_slots, dtype=torch.int64, device=device)
        self.reads = torch.zeros(n_slots, dtype=torch.int64, device=device)

    def __call__(self, indices_NHK: Tensor, weights_NHK: Tensor) -> None:
        ids_R = slot_ids(indices_NHK)
        self.present.index_fill_(0, ids_R, True)
        self.reads.index_add_(0, ids_R, torch.ones_like(ids_R))

    def end_batch(self) -> None:
        self.batches_with_slot += self.present
        self.present.zero_()


@torch.no_grad()
def count_background(
    model: nn.Module, batches: Iterable[Tensor], num_batches: int, progress: Callable[[int], None] | None = None
) -> BackgroundCounts:
    """Slot statistics of the first `num_batches` batches (each `(B, T+1)` int64; inputs `b[:, :-1]`).

    The model runs in eval mode (BatchNorm's running statistics, no dropout), as the memory modes
    keep it for their frozen parts; its observers are set aside and restored, its mode restored.
    Fewer batches than asked are counted when `batches` ends first (`num_batches` records how many).
    """
    pools = slot_pools(model)
    layers = memory_layers_of(model)
    device = next(iter(pools.values())).device
    counters = {name: _PoolCounter(pool.n_slots, device) for name, pool in pools.items()}
    saved = {i: memory.observer for i, memory in layers.items()}
    was_training = model.training
    model.eval()
    done = 0
    try:
        for name, pool in pools.items():
            for memory in pool.layers.values():
                memory.observer = counters[name]
        for batch_BT1 in batches:
            if done >= num_batches:
                break
            model(batch_BT1[:, :-1].to(device, non_blocking=True))
            for counter in counters.values():
                counter.end_batch()
            done += 1
            if progress is not None:
                progress(done)
    finally:
        for i, memory in layers.items():
            memory.observer = saved[i]
        model.train(was_training)
    if done == 0:
        raise ValueError("no background batches: the data gave none")
    return BackgroundCounts(
        done, {n: c.batches_with_slot for n, c in counters.items()}, {n: c.reads for n, c in counters.items()}
    )


# --- the cache file -------------------------------------------------------------------------------


def save_background(path: str | Path, counts: BackgroundCounts, fingerprint: Mapping) -> None:
    """Write `counts` atomically (a temporary file renamed over `path`)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"{name}/batches_with_slot": t.cpu().contiguous() for name, t in counts.batches_with_slot.items()}
    tensors.update({f"{name}/reads": t.cpu().contiguous() for name, t in counts.reads.items()})
    metadata = {"num_batches": str(counts.num_batches), "fingerprint": json.dumps(dict(fingerprint), sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_background(path: str | Path, fingerprint: Mapping, tables: Mapping[str, int]) -> BackgroundCounts | None:
    """The cached counts at `path` if they were made for `fingerprint` and these slot pools
    (`tables`: {name: n_slots}); None when absent, unreadable or made for something else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        num_batches = int(metadata["num_batches"])
        if json.loads(metadata["fingerprint"]) != json.loads(json.dumps(dict(fingerprint), sort_keys=True)):
            return None
    except (SafetensorError, OSError, KeyError, ValueError):
        return None
    expected = {f"{n}/{kind}": s for n, s in tables.items() for kind in ("batches_with_slot", "reads")}
    if set(tensors) != set(expected) or any(tensors[k].shape != (s,) for k, s in expected.items()):
        return None
    return BackgroundCounts(
        num_batches, {n: tensors[f"{n}/batches_with_slot"] for n in tables}, {n: tensors[f"{n}/reads"] for n in tables}
    )


def background_counts(
    model: nn.Module,
    path: str | Path,
    batches: Callable[[], Iterable[Tensor]],
    num_batches: int,
    fingerprint: Mapping,
    progress: Callable[[int], None] | None = None,
) -> BackgroundCounts:
    """The cached counts at `path` (see `load_background`), else count `num_batches` of `batches()`
    and cache them there. `fingerprint`: JSON-able, naming what the counts depend on (the
    init_from checkpoint, the data, batch size and sequence length, `num_batches`)."""
    pools = slot_pools(model)
    device = next(iter(pools.values())).device
    cached = load_background(path, fingerprint, {n: pool.n_slots for n, pool in pools.items()})
    if cached is not None:
        return cached.to(device)
    counts = count_background(model, batches(), num_batches, progress=progress)
    save_background(path, counts, fingerprint)
    return counts
