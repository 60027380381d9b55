"""Data pipeline: sources -> tokenizer -> packing -> loader.

    files = expand_files(cfg.files)                       # checked up front
    tok, info = load_or_train_tokenizer(cfg, files, cache_dir)
    train, val = build_data(cfg, tok, batch_size, seed, files=files)
    batch = next(train)                                   # (batch_size, seq_len + 1) int64
    state = train.state_dict()                            # plain JSON-able; load_state_dict resumes exactly

Everything that advances has `state_dict()` / `load_state_dict()` of plain lists, ints and dicts.
"""

from pkmlm.data.config import DataConfig
from pkmlm.data.loader import TokenBatches, build_data, check_data_config, validation_batches
from pkmlm.data.packing import Packer, ShuffleBuffer
from pkmlm.data.sources import DocumentStream, expand_files, file_kind, read_records
from pkmlm.data.tokenizer import (
    EOS_TOKEN,
    default_cache_dir,
    encode_documents,
    eos_id,
    load_or_train_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "DataConfig",
    "DocumentStream",
    "EOS_TOKEN",
    "Packer",
    "ShuffleBuffer",
    "TokenBatches",
    "build_data",
    "check_data_config",
    "default_cache_dir",
    "encode_documents",
    "eos_id",
    "expand_files",
    "file_kind",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "read_records",
    "train_bpe",
    "validation_batches",
]
