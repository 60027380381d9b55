"""Reading a prepared directory: training batches (`PreparedBatches`), the validation split, and
`PreparedInput`, the prepared directory as a `DataInput` (`pkmlm.data.batch_source`).

Training windows (`PreparedBatches`) are `seq_len + 1` tokens at stride `seq_len` inside each
shard (a shard's last partial window is not used: under seq_len tokens per shard of
`shard_tokens`). Each epoch orders all windows of all shards either `sequential`ly or by a seeded
random permutation (the same on every rank; epochs after the first also shift every window start
by a seeded offset in [0, seq_len), so the windows themselves change); rank r takes positions r,
r + world_size, ... of that order, so the ranks' windows are disjoint and together complete.
The state is (epoch, position): plain ints, exact on resume.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer

from pkmlm.data.batch_source import BatchSource
from pkmlm.data.config import DataConfig
from pkmlm.data.packing import Window
from pkmlm.data.prepared.index import load_index, load_prepared_tokenizer, open_shards
from pkmlm.errors import DataError


def prepared_validation_windows(directory: str, seq_len: int, max_windows: Optional[int] = None) -> List[List[int]]:
    """The validation split's windows, exactly as `validation_windows` packs the same documents."""
    shards = open_shards(directory, "val")
    if not shards:
        return []
    stream = np.concatenate([np.asarray(s) for s in shards]).astype(np.int64)
    width = seq_len + 1
    windows = [stream[s : s + width].tolist() for s in range(0, max(len(stream) - width + 1, 0), seq_len)]
    rest = len(stream) - (len(windows) * seq_len)  # tokens from the last window's final token on
    if max_windows is not None and len(windows) >= max_windows:
        return windows[:max_windows]
    if rest >= 2:
        windows.append(stream[len(windows) * seq_len :].tolist())
    return windows


class PreparedBatches:
    """Training batches `(batch_size, seq_len + 1)` int64 from prepared shards (a `BatchSource`); resumable exactly."""

    def __init__(self, cfg: DataConfig, directory: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg, self.directory = cfg, directory
        self.index = load_index(directory)
        self.shards = open_shards(directory, "train", self.index)
        self.seq_len, self.order = cfg.seq_len, cfg.prepared_order
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # windows of this epoch's order this rank has taken
        self.tokens = 0
        self.batches = 0
        self.stats: Dict[str, int] = {}
        self._epoch_cache: Optional[tuple] = None
        n_windows = self._windows_of(0)[0]
        if n_windows < world_size:
            raise DataError(
                f"data.prepared={directory!r} holds {n_windows} training windows of "
                f"data.seq_len={self.seq_len} + 1 tokens, fewer than the {world_size} ranks; prepare more "
                "data or lower data.seq_len"
            )

    @property
    def documents(self) -> int:
        return 0  # windows, not documents, are the unit here

    def _offset(self, epoch: int) -> int:
        if self.order == "sequential" or epoch == 0:
            return 0
        return random.Random(f"pkmlm-prepared-offset/seed={self.seed}/epoch={epoch}").randrange(self.seq_len)

    def _windows_of(self, epoch: int):
        """(total windows, cumulative window counts per shard, offset) of `epoch`."""
        offset = self._offset(epoch)
        counts = np.array([max(0, (len(s) - offset - 1) // self.seq_len) for s in self.shards], dtype=np.int64)
        return int(counts.sum()), np.cumsum(counts), offset

    def _epoch(self, epoch: int):
        """(epoch, this rank's window numbers in order, cumulative windows per shard, each shard's
        first window number, offset), computed once per epoch."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            total, cumulative, offset = self._windows_of(epoch)
            if self.order == "random":
                order = np.random.default_rng([self.seed, epoch]).permutation(total)
            else:
                order = np.arange(total)
            mine = order[self.rank :: self.world_size]  # this rank's windows, in order
            first_window = np.concatenate([[0], cumulative[:-1]])
            self._epoch_cache = (epoch, mine, cumulative, first_window, offset)
        return self._epoch_cache

    def __iter__(self) -> "PreparedBatches":
        return self

    def __next__(self) -> torch.Tensor:
        width = self.seq_len + 1
        out = np.empty((self.batch_size, width), dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            _, mine, cumulative, first_window, offset = self._epoch(self.epoch)
            take = mine[self.position : self.position + self.batch_size - filled]
            if len(take) == 0:
                self.epoch += 1
                self.position = 0
                continue
            shard_of = np.searchsorted(cumulative, take, side="right")  # (n,)
            starts = offset + (take - first_window[shard_of]) * self.seq_len
            for shard in np.unique(shard_of):
                rows = np.nonzero(shard_of == shard)[0]
                data = self.shards[shard]
                if len(rows) == 1:
                    s = starts[rows[0]]
                    out[filled + rows[0]] = data[s : s + width]
                else:
                    out[filled + rows] = data[starts[rows, None] + np.arange(width)]
            filled += len(take)
            self.position += len(take)
        self.batches += 1
        self.tokens += self.batch_size * self.seq_len
        return torch.from_numpy(out)

    def _layout(self) -> Dict[str, Any]:
        return {
            "prepared": self.index["id"],
            "seq_len": self.seq_len,
            "order": self.order,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {
            "kind": "prepared",
            "layout": self._layout(),
            "epoch": self.epoch,
            "position": self.position,
            "tokens": self.tokens,
            "batches": self.batches,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != "prepared":
            raise DataError(
                "cannot resume the data pipeline: the checkpoint read text sources, the config asks "
                "for data.prepared; resume with the run's saved data settings"
            )
        saved, now = state["layout"], self._layout()
        changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise DataError(
                "cannot resume the data pipeline with a different layout: "
                + "; ".join(changed)
                + "; resume with the run's saved data settings (and the same prepared directory)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.tokens, self.batches = int(state["tokens"]), int(state["batches"])


class PreparedInput:
    """A prepared directory as a `DataInput`: its own tokenizer, `PreparedBatches`, its val shards."""

    def __init__(self, directory: str):
        self.directory = directory

    @property
    def inputs(self) -> List[str]:
        return [self.directory]

    def tokenizer(self, cfg: DataConfig, cache_dir: str) -> Tuple[Tokenizer, Dict[str, Any]]:
        index = load_index(self.directory)
        tok, path = load_prepared_tokenizer(self.directory, index)
        return tok, {
            "source": "prepared",
            "path": path,
            "hash": index.get("tokenizer_hash"),
            "vocab_size": tok.get_vocab_size(),
        }

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Prepared token ids mean something only under the tokenizer that wrote them."""
        theirs, _ = load_prepared_tokenizer(self.directory)
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise DataError(
                f"data.prepared={self.directory!r} was tokenized with another tokenizer than the run's; "
                "prepare it with the run's (pkmlm-prepare data.tokenizer=RUN_DIR/tokenizer.json out=DIR)"
            )

    def train_batches(
        self, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seed: int, rank: int, world_size: int
    ) -> BatchSource:
        return PreparedBatches(cfg, self.directory, batch_size, seed, rank=rank, world_size=world_size)

    def validation_windows(self, cfg: DataConfig, tokenizer: Tokenizer, max_windows: Optional[int]) -> List[Window]:
        return prepared_validation_windows(self.directory, cfg.seq_len, max_windows)
