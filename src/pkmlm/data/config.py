"""Typed config of the data pipeline (the `data` group)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Literal, Optional

from pkmlm.errors import checked_once, require, require_one_of

PreparedOrder = Literal["random", "sequential"]  # data.prepared_order (pkmlm/data/prepared.py)


@dataclass
class SourceConfig:
    """One source of a mixture (`data.sources`): local files, or a Hugging Face Hub dataset."""

    name: Optional[str] = None  # label in logs and state; None = the first file or the Hub name
    files: List[str] = field(default_factory=list)  # paths or globs, as data.files; [] when `hub` is set
    hub: Optional[str] = None  # a Hub dataset streamed with datasets.load_dataset(hub, hub_config, split=...)
    hub_config: Optional[str] = None  # the Hub dataset's configuration (e.g. en for allenai/c4)
    split: str = "train"  # the Hub dataset's split
    text_field: Optional[str] = None  # None = data.text_field
    weight: float = 1.0  # sampling weight: the share of documents drawn from this source


@dataclass
class DataConfig:
    # Paths or globs, for training and evaluation alike; the reader is chosen by extension.
    files: List[str] = field(default_factory=lambda: ["${paths.sample_dir}/wiki/enwiki2015_first800.jsonl.gz"])
    text_field: str = "text"
    # A weighted mixture instead of data.files (which must then be []): see SourceConfig.
    sources: List[SourceConfig] = field(default_factory=list)
    seq_len: int = 128
    # Tokenizer: a tokenizer.json to load, or None to train a byte-level BPE on the stream's first
    # `tokenizer_docs` documents (cached by a hash of that text, the vocab size and special tokens).
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    tokenizer_docs: int = 2000
    special_tokens: List[str] = field(default_factory=list)  # added after <|endoftext|> (id 0), e.g. [<|pad|>]
    # Held-out validation split: the first `val_docs` documents of each source; training never sees them.
    val_docs: int = 20
    # Documents tokenized per `encode_batch` call (the Rust tokenizer parallelises within a call).
    encode_batch_docs: int = 64
    # Shuffle buffer of packed windows (0 = no shuffle); seeded by the run's `seed`. It is filled
    # before the first batch and holds at most 2**26 tokens: shuffle_buffer * (seq_len + 1).
    shuffle_buffer: int = 256
    # A record (a JSON line, a paragraph of plain text, a WET record; for Parquet and Hub records:
    # characters) longer than this is read no further and skipped, counted as too_long (docs/data.md).
    max_record_bytes: int = 32 * 2**20
    # A document longer than this many characters is tokenized in pieces of at most that many (cut
    # before whitespace: the same ids as the whole text unless a piece has none), counted as
    # split_docs; the Rust tokenizer needs about 170 bytes per character of one input (docs/data.md).
    max_doc_chars: int = 100_000
    # Bad records (malformed JSON, non-UTF-8, missing field, truncated gzip...) are skipped and
    # counted; strict=true makes the first one an error naming the file and line.
    strict: bool = False
    # Cleaning, each optional and counted: drop documents under `min_chars` characters (0 = keep
    # all), normalise to Unicode NFC, drop exact duplicates among the last `dedup_window` documents
    # of each reader (0 = off; by a 64-bit hash of the text).
    min_chars: int = 0
    nfc: bool = False
    dedup_window: int = 0
    # DataLoader worker processes per rank (0 = read in the training process).
    num_workers: int = 0
    # Pre-tokenized shards written by pkmlm-prepare (data=prepared): the directory, and the order
    # of training windows: random (a seeded permutation per epoch) | sequential.
    prepared: Optional[str] = None
    prepared_order: str = "random"

    @checked_once  # resolve_data, pkmlm.config.validate, pkmlm-prepare and pkmlm-eval all ask
    def validate(self) -> None:
        """Range checks of every `data.*` value that needs no file (the schema checks the types); a
        `ConfigError` naming the first bad key. Paths and sources are checked by `resolve_data`."""
        require(self.seq_len >= 1, "data.seq_len", self.seq_len, "an integer >= 1 (tokens per training sequence)")
        require(
            bool(self.text_field), "data.text_field", self.text_field, "the name of the records' text field, e.g. text"
        )
        specials = list(self.special_tokens)
        require(
            all(isinstance(t, str) and t for t in specials),
            "data.special_tokens",
            specials,
            "non-empty strings, e.g. ['<|pad|>']",
        )
        require(
            len(set(specials)) == len(specials), "data.special_tokens", specials, "distinct tokens (each listed once)"
        )
        n_special = len(extra_special_tokens(self))
        require(
            self.vocab_size >= MIN_VOCAB_SIZE + n_special,
            "data.vocab_size",
            self.vocab_size,
            f"an integer >= {MIN_VOCAB_SIZE + n_special} (256 bytes + {EOS_TOKEN}"
            + (f" + {n_special} data.special_tokens)" if n_special else ")"),
        )
        require(
            self.tokenizer_docs >= 1,
            "data.tokenizer_docs",
            self.tokenizer_docs,
            "an integer >= 1 (documents to train the tokenizer on)",
        )
        require(self.val_docs >= 0, "data.val_docs", self.val_docs, "an integer >= 0 (0: no validation split)")
        require(
            1 <= self.encode_batch_docs <= MAX_ENCODE_BATCH_DOCS,
            "data.encode_batch_docs",
            self.encode_batch_docs,
            f"an integer in [1, {MAX_ENCODE_BATCH_DOCS}]",
        )
        most = MAX_SHUFFLE_TOKENS // (self.seq_len + 1)
        require(
            0 <= self.shuffle_buffer <= most,
            "data.shuffle_buffer",
            self.shuffle_buffer,
            f"an integer in [0, {most}] (0 turns shuffling off; the buffer is filled before the first batch and "
            f"holds at most 2**26 tokens: {most} windows of data.seq_len + 1 = {self.seq_len + 1})",
        )
        require(
            self.max_record_bytes >= 1024,
            "data.max_record_bytes",
            self.max_record_bytes,
            "an integer >= 1024 (longer records are skipped and counted as too_long)",
        )
        require(
            self.max_doc_chars >= 64,
            "data.max_doc_chars",
            self.max_doc_chars,
            "an integer >= 64 (longer documents are tokenized in pieces of this many characters)",
        )
        require(self.min_chars >= 0, "data.min_chars", self.min_chars, "an integer >= 0 (0 keeps every document)")
        require(
            self.dedup_window >= 0,
            "data.dedup_window",
            self.dedup_window,
            "an integer >= 0 (0 turns deduplication off)",
        )
        require(
            0 <= self.num_workers <= MAX_NUM_WORKERS,
            "data.num_workers",
            self.num_workers,
            f"an integer in [0, {MAX_NUM_WORKERS}] (0 reads in the training process)",
        )
        require_one_of("data.prepared_order", self.prepared_order, PreparedOrder)


# 256 byte tokens + <|endoftext|>: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 257
MAX_RECORD_BYTES = DataConfig.max_record_bytes
MAX_DOC_CHARS = DataConfig.max_doc_chars
# The shuffle buffer's bound: 2**26 int32 tokens (256 MiB), tokenized before the first batch.
MAX_SHUFFLE_TOKENS = 2**26
MAX_ENCODE_BATCH_DOCS = 4096  # documents per tokenizer call: each up to max_doc_chars characters
MAX_NUM_WORKERS = 256
EOS_TOKEN = "<|endoftext|>"


def default_cache_dir() -> str:
    """`$PKMLM_CACHE_DIR`, else `~/.cache/pkmlm` (tokenizers trained from a stream)."""
    return os.environ.get("PKMLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pkmlm")


def extra_special_tokens(cfg: DataConfig) -> List[str]:
    """`data.special_tokens` without <|endoftext|> (always present, id 0): the ids 1, 2, ... they take."""
    return [t for t in cfg.special_tokens if t != EOS_TOKEN]


check_data_config = DataConfig.validate  # the name pkmlm-prepare, pkmlm-eval and resolve_data call
