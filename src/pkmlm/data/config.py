"""Typed config of the data pipeline (the `data` group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataConfig:
    # Paths or globs, for training and evaluation alike; the reader is chosen by extension.
    files: List[str] = field(default_factory=lambda: ["${paths.sample_dir}/wiki-en-2015/enwiki2015_AA.jsonl.gz"])
    text_field: str = "text"
    seq_len: int = 128
    # Tokenizer: a tokenizer.json to load, or None to train a byte-level BPE on the stream's first
    # `tokenizer_docs` documents (cached by a hash of that text and the vocab size).
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    tokenizer_docs: int = 2000
    # Held-out validation split: the stream's first `val_docs` documents; training never sees them.
    val_docs: int = 20
    # Documents tokenized per `encode_batch` call (the Rust tokenizer parallelises within a call).
    encode_batch_docs: int = 64
    # Shuffle buffer of packed windows (0 = no shuffle); seeded by the run's `seed`.
    shuffle_buffer: int = 256
    strict: bool = False
