"""The two contracts of the data package: `BatchSource` (what the trainer reads batches from) and
`DataInput` (one kind of input, text sources or prepared shards, and how each is read).

A `BatchSource` is an endless iterator of training batches whose position is plain state:

    batch = next(source)            # (batch_size, seq_len + 1) int64; inputs [:, :-1], targets [:, 1:]
    state = source.state_dict()     # plain lists, ints and dicts (JSON): saved in every checkpoint
    source.load_state_dict(state)   # a fresh source continues with exactly the batches that followed

Restoring into a source built with another layout (batch size, rank, seq_len, seed, the inputs)
raises `DataError`, one line naming what changed. Counters: `tokens` (target tokens yielded),
`batches` (batches yielded), `epoch` (completed passes over the training data) and `stats` (records
skipped or changed, by kind: `loader.stats_row` logs them). Implemented by `loader.TokenBatches`
(streamed text, read in the training process), `loader.WorkerBatches` (streamed text, read in
DataLoader workers), `prepared.PreparedBatches` (pre-tokenized shards) and, over several data
shards, `parallel.data_shards.DataShards`; `tests/unit/test_batch_source.py` checks each against it.

A `DataInput` is what a `DataPlan` is read as: its tokenizer, its training `BatchSource`, its
validation windows. `loader.data_input(plan)` is the one place that picks one (`loader.TextInput`
or `prepared.PreparedInput`); everything else calls the methods. How to add a batch source:
docs/architecture.md.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Protocol, Tuple, runtime_checkable

import torch
from tokenizers import Tokenizer

from pkmlm.data.config import DataConfig
from pkmlm.data.packing import Window


@runtime_checkable
class BatchSource(Protocol):
    """Endless `(batch_size, seq_len + 1)` int64 training batches with an exact, plain position."""

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    def __next__(self) -> torch.Tensor: ...

    @property
    def tokens(self) -> int: ...

    @property
    def batches(self) -> int: ...

    @property
    def epoch(self) -> int: ...

    @property
    def stats(self) -> Dict[str, int]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


@runtime_checkable
class DataInput(Protocol):
    """One kind of data input, as training and evaluation read it."""

    @property
    def inputs(self) -> List[str]:
        """What the data is read from (files, Hub datasets, a directory), for messages."""
        ...

    def tokenizer(self, cfg: DataConfig, cache_dir: str) -> Tuple[Tokenizer, Dict[str, Any]]:
        """The tokenizer of this input, and {"source", "path", "hash", "vocab_size"}."""
        ...

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse (DataError) a tokenizer other than the one this input's ids belong to, if any."""
        ...

    def train_batches(
        self, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seed: int, rank: int, world_size: int
    ) -> BatchSource:
        """The training batches of data shard `rank` of `world_size`."""
        ...

    def validation_windows(self, cfg: DataConfig, tokenizer: Tokenizer, max_windows: int | None) -> List[Window]:
        """The validation split packed in stream order; the last window may be short (>= 2 tokens)."""
        ...
