"""Batches of token windows for training and validation.

Splits (deterministic, by position in the stream of documents over `data.files` in order):
- validation: the first `data.val_docs` documents;
- training: every later document, read again each epoch, forever. With several ranks, rank r
  takes the training documents whose index (counted from the first training document) is r mod
  world_size, so the ranks read disjoint documents; each rank reads (and skips) the others'.

Training pipeline, per rank: documents -> `encode_documents` (`data.encode_batch_docs` per call)
-> `Packer` -> `ShuffleBuffer` (`data.shuffle_buffer` windows, seeded by `seed` and rank) ->
`(batch_size, seq_len + 1)` int64 tensors. Inputs are `batch[:, :-1]`, targets `batch[:, 1:]`.
The packer and shuffle buffer carry over epoch boundaries (no partial window is dropped, no
buffer drained) and the shuffle RNG keeps advancing, so epoch 2 is ordered differently.

`TokenBatches.state_dict()` holds the whole pipeline (stream position, epoch, packed windows not
yet shuffled, packer leftover, shuffle buffer and RNG) as plain lists and ints: restoring it gives
batches bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tokenizers import Tokenizer

from pkmlm.data.config import DataConfig
from pkmlm.data.packing import Packer, ShuffleBuffer, Window
from pkmlm.data.sources import DocumentStream, expand_files
from pkmlm.data.tokenizer import encode_documents, eos_id
from pkmlm.errors import ConfigError, DataError

STATE_VERSION = 1


def check_data_config(cfg: DataConfig) -> None:
    """Range checks of the values the loader uses (the schema checks the types)."""
    if cfg.seq_len < 1:
        raise ConfigError("data.seq_len", cfg.seq_len, "an integer >= 1 (tokens per training sequence)")
    if cfg.encode_batch_docs < 1:
        raise ConfigError("data.encode_batch_docs", cfg.encode_batch_docs, "an integer >= 1")
    if cfg.shuffle_buffer < 0:
        raise ConfigError("data.shuffle_buffer", cfg.shuffle_buffer, "an integer >= 0 (0 turns shuffling off)")
    if cfg.val_docs < 0:
        raise ConfigError("data.val_docs", cfg.val_docs, "an integer >= 0 (0: no validation split)")
    if not cfg.text_field:
        raise ConfigError("data.text_field", cfg.text_field, "the name of the records' text field, e.g. text")


class TokenBatches:
    """Endless training batches: `next()` gives an int64 tensor `(batch_size, seq_len + 1)`.

    Counters: `epoch` (completed passes over the training split), `documents` (training documents
    this rank has read), `tokens` (target tokens yielded: batch_size * seq_len per batch),
    `batches`; `stats` counts the current epoch's skipped records by kind.
    """

    def __init__(self, cfg: DataConfig, files: Sequence[str], tokenizer: Tokenizer, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        check_data_config(cfg)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg = cfg
        self.files = list(files)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._packer = Packer(cfg.seq_len, eos_id(tokenizer))
        self._shuffle = ShuffleBuffer(cfg.shuffle_buffer, seed=f"pkmlm-shuffle/seed={seed}/rank={rank}")
        self._windows: Deque[Window] = deque()  # packed, not yet through the shuffle buffer
        self.epoch = 0
        self._doc_index = 0  # documents of this epoch's stream read so far (all splits, all ranks)
        self._epoch_docs = 0  # of which this rank's training documents
        self._stream = self._new_stream()
        self._docs: Optional[Iterator[str]] = None  # live iterator over self._stream
        self.documents = 0
        self.tokens = 0
        self.batches = 0

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> torch.Tensor:
        rows: List[Window] = []
        while len(rows) < self.batch_size:
            while not self._windows:
                self._pack_more()
            out = self._shuffle.push(self._windows.popleft())
            if out is not None:
                rows.append(out)
        batch_BT = torch.tensor(rows, dtype=torch.long)  # (B, seq_len + 1)
        self.batches += 1
        self.tokens += self.batch_size * self.cfg.seq_len
        return batch_BT

    @property
    def stats(self) -> Dict[str, int]:
        return dict(self._stream.stats)

    def _new_stream(self) -> DocumentStream:
        return DocumentStream(self.files, text_field=self.cfg.text_field, strict=self.cfg.strict)

    def _next_training_text(self) -> str:
        val_docs, world_size = self.cfg.val_docs, self.world_size
        while True:
            if self._docs is None:
                self._docs = iter(self._stream)
            text = next(self._docs, None)
            if text is None:
                self._start_next_epoch()
                continue
            index = self._doc_index
            self._doc_index += 1
            if index >= val_docs and (index - val_docs) % world_size == self.rank:
                self._epoch_docs += 1
                self.documents += 1
                return text

    def _start_next_epoch(self) -> None:
        if self._epoch_docs == 0:
            n, v = self._doc_index, self.cfg.val_docs
            if n > v:
                who = f"rank {self.rank} of {self.world_size} gets none of its {n - v} training documents"
            else:
                who = f"all {n} documents are held out for validation by data.val_docs={v}"
            raise DataError(
                f"the training split of data.files ({len(self.files)} files) is empty: {who}; "
                "lower data.val_docs or add files to data.files"
            )
        self.epoch += 1
        self._doc_index = 0
        self._epoch_docs = 0
        self._stream = self._new_stream()
        self._docs = None

    def _pack_more(self) -> None:
        texts = [self._next_training_text() for _ in range(self.cfg.encode_batch_docs)]
        for ids in encode_documents(self.tokenizer, texts):
            self._windows.extend(self._packer.push(ids))

    # -- state -------------------------------------------------------------------------------

    def _layout(self) -> Dict[str, Any]:
        """What must match for a saved position to mean the same thing on resume."""
        cfg = self.cfg
        return {"seq_len": cfg.seq_len, "val_docs": cfg.val_docs, "shuffle_buffer": cfg.shuffle_buffer,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size,
                "n_files": len(self.files), "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "layout": self._layout(),
            "epoch": self.epoch,
            "doc_index": self._doc_index,
            "epoch_docs": self._epoch_docs,
            "stream": self._stream.state_dict(),
            "windows": [list(w) for w in self._windows],
            "packer": self._packer.state_dict(),
            "shuffle": self._shuffle.state_dict(),
            "documents": self.documents,
            "tokens": self.tokens,
            "batches": self.batches,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"cannot resume the data pipeline: state version {state.get('version')!r}, "
                            f"this code reads version {STATE_VERSION}")
        saved, now = state["layout"], self._layout()
        changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            raise DataError("cannot resume the data pipeline with a different layout: " + "; ".join(changed)
                            + "; resume with the run's saved data settings")
        self.epoch = int(state["epoch"])
        self._doc_index = int(state["doc_index"])
        self._epoch_docs = int(state["epoch_docs"])
        self._stream = self._new_stream()
        self._stream.load_state_dict(state["stream"])
        self._docs = None
        self._windows = deque(list(w) for w in state["windows"])
        self._packer.load_state_dict(state["packer"])
        self._shuffle.load_state_dict(state["shuffle"])
        self.documents = int(state["documents"])
        self.tokens = int(state["tokens"])
        self.batches = int(state["batches"])


def validation_windows(cfg: DataConfig, files: Sequence[str], tokenizer: Tokenizer) -> List[Window]:
    """All windows of the validation split (the first `cfg.val_docs` documents), in order; the
    last may be shorter than `seq_len + 1` (at least 2 tokens)."""
    check_data_config(cfg)
    packer = Packer(cfg.seq_len, eos_id(tokenizer))
    stream = DocumentStream(files, text_field=cfg.text_field, strict=cfg.strict)
    texts = itertools.islice(stream, cfg.val_docs)
    windows: List[Window] = []
    while chunk := list(itertools.islice(texts, cfg.encode_batch_docs)):
        for ids in encode_documents(tokenizer, chunk):
            windows.extend(packer.push(ids))
    tail = packer.flush()
    if tail is not None:
        windows.append(tail)
    return windows


def validation_batches(cfg: DataConfig, files: Sequence[str], tokenizer: Tokenizer,
                       batch_size: int) -> List[torch.Tensor]:
    """The validation split as int64 tensors `(b, seq_len + 1)`, b <= batch_size, in stream order,
    unshuffled, every window kept. The final partial window, when there is one, is a batch of its
    own of shape `(1, L)` with 2 <= L <= seq_len (tensors cannot be ragged, and padding would need
    the loss to know about it). `[]` when `cfg.val_docs == 0`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cfg.val_docs == 0:
        return []
    windows = validation_windows(cfg, files, tokenizer)
    width = cfg.seq_len + 1
    full = [w for w in windows if len(w) == width]
    batches = [torch.tensor(full[i : i + batch_size], dtype=torch.long) for i in range(0, len(full), batch_size)]
    if len(full) < len(windows):
        batches.append(torch.tensor([windows[-1]], dtype=torch.long))  # (1, L)
    return batches


def build_data(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, seed: int,
               files: Optional[Sequence[str]] = None, rank: int = 0,
               world_size: int = 1) -> Tuple[TokenBatches, List[torch.Tensor]]:
    """Training batches and the validation batch list; `files` defaults to `expand_files(cfg.files)`."""
    files = expand_files(cfg.files) if files is None else list(files)
    train = TokenBatches(cfg, files, tokenizer, batch_size, seed, rank=rank, world_size=world_size)
    return train, validation_batches(cfg, files, tokenizer, batch_size)
