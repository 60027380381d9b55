"""Typed config of the data pipeline (the `data` group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


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
    files: List[str] = field(default_factory=lambda: ["${paths.sample_dir}/wiki-en-2015/enwiki2015_AA.jsonl.gz"])
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
    # Shuffle buffer of packed windows (0 = no shuffle); seeded by the run's `seed`.
    shuffle_buffer: int = 256
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
