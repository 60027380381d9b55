"""Pre-tokenized shards: `pkmlm-prepare` writes them once, `data=prepared` trains from them fast.

Directory layout (`out=DIR`):

    index.json        format, dtype, eos_id, vocab size, the shards of each split with their token
                      and document counts, skipped-record counts, the data config it was made from
    tokenizer.json    the tokenizer the ids belong to (training loads this one)
    train_00000.bin   token ids, raw little-endian uint16 when the vocabulary fits (<= 65,536
    train_00001.bin   ids), else uint32; read with np.memmap, never loaded whole
    val_00000.bin     the validation split (the first data.val_docs documents of each source)

Each shard holds the packer's token stream `EOS d1 EOS d2 ... dn EOS` (leading EOS, an EOS after
every document, as `Packer` builds it), so the validation windows read from `val_00000.bin` are
exactly those `validation_batches` packs from the text. Training documents are one pass over
each source after its validation documents, cleaned, interleaved by weight (seeded) until every
source is used up.

Training windows (`PreparedBatches`) are `seq_len + 1` tokens at stride `seq_len` inside each
shard (a shard's last partial window is not used: under seq_len tokens per shard of
`shard_tokens`). Each epoch orders all windows of all shards either `sequential`ly or by a seeded
random permutation (the same on every rank; epochs after the first also shift every window start
by a seeded offset in [0, seq_len), so the windows themselves change); rank r takes positions r,
r + world_size, ... of that order, so the ranks' windows are disjoint and together complete.
The state is (epoch, position): plain ints, exact on resume.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import uuid
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer

from pkmlm.data.config import DataConfig
from pkmlm.data.mixing import Source, interleave, make_cleaner, merge_counts, validation_documents
from pkmlm.data.tokenizer import encode_documents, eos_id, load_tokenizer
from pkmlm.errors import DataError

FORMAT = "pkmlm-prepared/1"
INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 2^16), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def load_index(directory: str) -> Dict[str, Any]:
    """The prepared directory's index, or a DataError naming `data.prepared` and what to do."""
    path = os.path.join(os.path.abspath(os.path.expanduser(directory)), INDEX)
    if not os.path.isfile(path):
        raise DataError(f"data.prepared={directory!r}: no {INDEX} there ({path}); write the directory with "
                        "pkmlm-prepare data=... out=DIR first")
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"data.prepared={directory!r}: {path} cannot be read ({e}); prepare it again") from None
    if index.get("format") != FORMAT:
        raise DataError(f"data.prepared={directory!r}: format {index.get('format')!r}, this code reads {FORMAT}; "
                        "prepare it again")
    base = os.path.dirname(path)
    for split in ("train", "val"):
        for shard in index["splits"][split]:
            shard_path = os.path.join(base, shard["file"])
            expected = shard["tokens"] * np.dtype(index["dtype"]).itemsize
            if not os.path.isfile(shard_path) or os.path.getsize(shard_path) != expected:
                raise DataError(f"data.prepared={directory!r}: shard {shard['file']} is missing or not "
                                f"{expected} bytes; prepare the directory again")
    return index


def load_prepared_tokenizer(directory: str, index: Optional[Dict[str, Any]] = None) -> Tuple[Tokenizer, str]:
    """The tokenizer the directory's token ids belong to, and its path."""
    index = index or load_index(directory)
    path = os.path.join(os.path.abspath(os.path.expanduser(directory)), index["tokenizer"])
    return load_tokenizer(path, key="data.prepared"), path


def open_shards(directory: str, split: str, index: Optional[Dict[str, Any]] = None) -> List[np.memmap]:
    index = index or load_index(directory)
    base = os.path.abspath(os.path.expanduser(directory))
    return [np.memmap(os.path.join(base, s["file"]), dtype=np.dtype(index["dtype"]), mode="r", shape=(s["tokens"],))
            for s in index["splits"][split] if s["tokens"] > 0]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends documents' ids to `{split}_{k:05d}.bin` files of about `shard_tokens` tokens each,
    every shard starting with EOS and every document followed by EOS."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, eos: int, shard_tokens: Optional[int]):
        self.directory, self.split, self.dtype, self.eos = directory, split, dtype, eos
        self.shard_tokens = shard_tokens
        self.shards: List[Dict[str, Any]] = []
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(os.path.join(self.directory, name), "wb")
        self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self._write(np.array([self.eos], dtype=self.dtype))

    def _write(self, ids: np.ndarray) -> None:
        self._file.write(ids.astype("<" + self.dtype.str[1:], copy=False).tobytes())
        self.shards[-1]["tokens"] += len(ids)

    def add(self, docs: Sequence[Sequence[int]]) -> None:
        for ids in docs:
            if self._file is None:
                self._open()
            self._write(np.array(list(ids) + [self.eos], dtype=self.dtype))
            self.shards[-1]["documents"] += 1
            if self.shard_tokens is not None and self.shards[-1]["tokens"] >= self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _one_pass(source: Source, cfg: DataConfig, counts: Dict[str, Dict[str, int]]) -> Iterator[str]:
    """The source's training documents, one pass: after its validation documents, cleaned."""
    stream = source.stream(cfg.strict)
    cleaner = make_cleaner(cfg)
    seen_val = 0
    for doc in stream.documents_iter():
        text = cleaner(doc.text)
        if text is None:
            continue
        if seen_val < cfg.val_docs:
            seen_val += 1
            continue
        yield text
    counts[source.name] = merge_counts(stream.stats, cleaner.stats)


def prepare(cfg: DataConfig, sources: List[Source], tokenizer, out_dir: str, shard_tokens: int = 100_000_000,
            tokenizer_hash: Optional[str] = None, progress=None) -> Dict[str, Any]:
    """Tokenize the validation and training splits of `sources` into shards under `out_dir`
    (written under a temporary name, renamed when complete). Returns the index."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"out={out_dir!r} exists and is not an empty directory; remove it or choose another out")
    vocab = tokenizer.get_vocab_size()
    dtype, eos = token_dtype(vocab), eos_id(tokenizer)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        counts: Dict[str, Dict[str, int]] = {}
        writers = {}
        for split in ("val", "train"):
            writer = _ShardWriter(tmp, split, dtype, eos, None if split == "val" else shard_tokens)
            if split == "val":
                texts: Iterator[str] = (t for s in sources for t in validation_documents(s, cfg))
            else:
                texts = interleave([_one_pass(s, cfg, counts) for s in sources], [s.weight for s in sources],
                                   seed="pkmlm-prepare")
            while chunk := list(itertools.islice(texts, cfg.encode_batch_docs)):
                writer.add(encode_documents(tokenizer, chunk))
                if progress is not None:
                    progress(split, sum(s["tokens"] for s in writer.shards))
            writer.close()
            writers[split] = writer
        index = {
            "format": FORMAT, "id": uuid.uuid4().hex, "dtype": dtype.name, "eos_id": eos, "vocab_size": vocab,
            "tokenizer": "tokenizer.json", "tokenizer_hash": tokenizer_hash,
            "splits": {split: w.shards for split, w in writers.items()},
            "tokens": {split: sum(s["tokens"] for s in w.shards) for split, w in writers.items()},
            "documents": {split: sum(s["documents"] for s in w.shards) for split, w in writers.items()},
            "skipped": counts, "sources": [{"name": s.name, "weight": s.weight} for s in sources],
            "data_config": _config_dict(cfg),
        }
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _config_dict(cfg: DataConfig) -> Dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


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
    """Training batches `(batch_size, seq_len + 1)` int64 from prepared shards; resumable exactly."""

    def __init__(self, cfg: DataConfig, directory: str, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
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
            raise DataError(f"data.prepared={directory!r} holds {n_windows} training windows of "
                            f"data.seq_len={self.seq_len} + 1 tokens, fewer than the {world_size} ranks; prepare more "
                            "data or lower data.seq_len")

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
        return {"prepared": self.index["id"], "seq_len": self.seq_len, "order": self.order,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size, "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "prepared", "layout": self._layout(), "epoch": self.epoch, "position": self.position,
                "tokens": self.tokens, "batches": self.batches}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != "prepared":
            raise DataError("cannot resume the data pipeline: the checkpoint read text sources, the config asks "
                            "for data.prepared; resume with the run's saved data settings")
        saved, now = state["layout"], self._layout()
        changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise DataError("cannot resume the data pipeline with a different layout: " + "; ".join(changed)
                            + "; resume with the run's saved data settings (and the same prepared directory)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.tokens, self.batches = int(state["tokens"]), int(state["batches"])
