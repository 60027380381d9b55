"""The global batch as a fixed number of data shards, spread over however many ranks run.

A run's training data is `n` logical streams (`train.data_shards`, by default the number of
processes the run started with, fixed for its whole life and saved in its checkpoints): shard s
reads the training documents whose index is s mod n (`TokenBatches(rank=s, world_size=n)`) and
gives `train.batch_size / n` sequences per step. Rank r of W runs shards r, r + W, r + 2W, ...
and concatenates their batches; the global batch of a step is the concatenation of all n shard
batches in shard order, whatever W is.

So the data a run sees does not depend on how many processes run it:
- a checkpoint saved on 2 ranks resumes on 1 (one process runs both shards) or on 2 with exactly
  the batches the original run would have seen (W must divide n);
- one process with `train.data_shards=2` trains on the same global batches as 2 processes, which
  is how the tests compare a 2-process run with a 1-process run.

A run with one shard on one process uses its `TokenBatches` directly (the single-process format,
unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pkmlm.data.batch_source import BatchSource
from pkmlm.errors import ConfigError, DataError, UserError
from pkmlm.parallel.env import DistInfo

# make_shard(shard index, number of shards, sequences per shard and step) -> that shard's batches
# (a BatchSource of `b` sequences per batch: `pkmlm.data.loader.build_train_batches`).
ShardFactory = Callable[[int, int, int], BatchSource]


def plan_data_shards(configured: int | None, batch_size: int, info: DistInfo, resumed: int | None = None) -> int:
    """The run's number of data shards: the checkpoint's when resuming, else `train.data_shards`,
    else the number of processes; checked against the batch size and the process count."""
    n = resumed or configured or info.world_size
    if configured is not None and resumed is not None and configured != resumed:
        raise ConfigError(
            "train.data_shards",
            configured,
            f"the run being resumed has {resumed} data shards; leave train.data_shards unset",
        )
    if n < 1:
        raise ConfigError("train.data_shards", n, "a positive number of shards, or null (the process count)")
    if batch_size % n:
        raise ConfigError(
            "train.batch_size",
            batch_size,
            f"a multiple of the run's {n} data shards (train.data_shards, or the process count)",
        )
    if n % info.world_size:
        where = "this run's checkpoints have" if resumed else "train.data_shards gives"
        raise UserError(
            f"{info.world_size} processes cannot split {n} data shards ({where} {n}): run it on a number of "
            f"processes that divides {n}, or start a new run with train.data_shards set to a multiple of every "
            "process count you will use (e.g. 8)"
        )
    return n


class DataShards:
    """This rank's shards of the global batch: `next()` gives `(batch_size / W, seq_len + 1)`. A
    `BatchSource` itself: its counters are the sums (`tokens`) or the first shard's (`batches`,
    `epoch`), its state one entry per shard."""

    def __init__(self, make_shard: ShardFactory, batch_size: int, n_shards: int, info: DistInfo):
        self.n_shards = n_shards
        per_shard = batch_size // n_shards
        self.shards: dict[int, BatchSource] = {
            s: make_shard(s, n_shards, per_shard) for s in range(info.rank, n_shards, info.world_size)
        }

    def __iter__(self) -> DataShards:
        return self

    def __next__(self) -> torch.Tensor:
        return torch.cat([next(self.shards[s]) for s in sorted(self.shards)])  # shard order

    @property
    def stats(self) -> dict[str, int]:
        """Skipped-record counts of this rank's shards, summed (rank 0's are the ones logged)."""
        total: dict[str, int] = {}
        for shard in self.shards.values():
            for key, value in dict(shard.stats).items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def _first(self) -> BatchSource:
        return self.shards[min(self.shards)]

    @property
    def epoch(self) -> int:
        return self._first.epoch

    @property
    def batches(self) -> int:
        return self._first.batches  # every shard gives one batch per step

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards.values())

    # -- state: one entry per shard, keyed by shard index ---------------------------------------

    def shard_states(self) -> dict[int, Any]:
        return {s: shard.state_dict() for s, shard in self.shards.items()}

    def load_shard_states(self, states: dict[int, Any]) -> None:
        missing = sorted(set(self.shards) - set(states))
        if missing:
            raise DataError(f"cannot resume the data pipeline: the checkpoint has no state for data shards {missing}")
        for s, shard in self.shards.items():
            shard.load_state_dict(states[s])

    def state_dict(self) -> dict[str, Any]:
        return {"data_shards": self.n_shards, "shards": {str(s): st for s, st in self.shard_states().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("data_shards") != self.n_shards:
            raise DataError(
                f"cannot resume the data pipeline: the checkpoint has {state.get('data_shards')} data "
                f"shards, this run {self.n_shards}"
            )
        self.load_shard_states({int(s): st for s, st in state["shards"].items()})


def build_batches(make_shard: ShardFactory, batch_size: int, n_shards: int, info: DistInfo) -> BatchSource:
    """A plain `make_shard(0, 1, batch_size)` for one shard on one process, else `DataShards`."""
    if n_shards == 1 and not info.distributed:
        return make_shard(0, 1, batch_size)
    return DataShards(make_shard, batch_size, n_shards, info)


def shard_states(batches: BatchSource) -> dict[int, Any]:
    """Shard index -> state, for `DataShards` and for a single plain pipeline (shard 0)."""
    if isinstance(batches, DataShards):
        return batches.shard_states()
    return {0: batches.state_dict()}


def load_shard_states(batches: BatchSource, states: dict[int, Any]) -> None:
    if isinstance(batches, DataShards):
        batches.load_shard_states(states)
    else:
        batches.load_state_dict(states[0])


def saved_data_shards(state: dict[str, Any]) -> int:
    """How many data shards a checkpoint's run has (1 for the single-process `data` format)."""
    if "data_shards" in state:
        return int(state["data_shards"])
    data = state.get("data")
    if isinstance(data, dict) and "data_shards" in data:
        return int(data["data_shards"])
    return 1
