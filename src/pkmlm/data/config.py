"""Typed config of the data pipeline (the `data` group)."""

from __future__ import annotations

import os
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


# 256 byte tokens + <|endoftext|>: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 257
EOS_TOKEN = "<|endoftext|>"


def default_cache_dir() -> str:
    """`$PKMLM_CACHE_DIR`, else `~/.cache/pkmlm` (tokenizers trained from a stream)."""
    return os.environ.get("PKMLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pkmlm")


def extra_special_tokens(cfg: DataConfig) -> List[str]:
    """`data.special_tokens` without <|endoftext|> (always present, id 0): the ids 1, 2, ... they take."""
    return [t for t in cfg.special_tokens if t != EOS_TOKEN]


def check_data_config(cfg: DataConfig) -> None:
    """Range checks of every `data.*` value that needs no file (the schema checks the types); a
    `ConfigError` naming the first bad key. Paths and sources are checked by `resolve_data`."""
    from pkmlm.errors import ConfigError

    def at_least(key: str, value: int, low: int, allowed: str) -> None:
        if value < low:
            raise ConfigError(key, value, allowed)

    at_least("data.seq_len", cfg.seq_len, 1, "an integer >= 1 (tokens per training sequence)")
    if not cfg.text_field:
        raise ConfigError("data.text_field", cfg.text_field, "the name of the records' text field, e.g. text")
    specials = list(cfg.special_tokens)
    for token in specials:
        if not isinstance(token, str) or not token:
            raise ConfigError("data.special_tokens", specials, "non-empty strings, e.g. ['<|pad|>']")
    if len(set(specials)) != len(specials):
        raise ConfigError("data.special_tokens", specials, "distinct tokens (each listed once)")
    n_special = len(extra_special_tokens(cfg))
    at_least("data.vocab_size", cfg.vocab_size, MIN_VOCAB_SIZE + n_special,
             f"an integer >= {MIN_VOCAB_SIZE + n_special} (256 bytes + {EOS_TOKEN}"
             + (f" + {n_special} data.special_tokens)" if n_special else ")"))
    at_least("data.tokenizer_docs", cfg.tokenizer_docs, 1, "an integer >= 1 (documents to train the tokenizer on)")
    at_least("data.val_docs", cfg.val_docs, 0, "an integer >= 0 (0: no validation split)")
    at_least("data.encode_batch_docs", cfg.encode_batch_docs, 1, "an integer >= 1")
    at_least("data.shuffle_buffer", cfg.shuffle_buffer, 0, "an integer >= 0 (0 turns shuffling off)")
    at_least("data.min_chars", cfg.min_chars, 0, "an integer >= 0 (0 keeps every document)")
    at_least("data.dedup_window", cfg.dedup_window, 0, "an integer >= 0 (0 turns deduplication off)")
    at_least("data.num_workers", cfg.num_workers, 0, "an integer >= 0 (0 reads in the training process)")
    if cfg.prepared_order not in ("random", "sequential"):
        raise ConfigError("data.prepared_order", cfg.prepared_order, "random or sequential")
