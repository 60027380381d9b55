"""Data pipeline: sources -> cleaning -> mixing -> tokenizer -> packing -> loader (or prepared shards).

    plan = resolve_data(cfg)                                # checked up front: globs, values, prepared index
    tok, info = load_or_train_tokenizer(cfg, plan, cache_dir)
    train = build_train_batches(cfg, plan, tok, batch_size, seed, rank, world_size)  # a BatchSource
    val = validation_batches(cfg, plan, tok, batch_size)
    batch = next(train)                                     # (batch_size, seq_len + 1) int64
    state = train.state_dict()                              # plain JSON-able; load_state_dict resumes exactly

`data_input(plan)` is the one place that picks how a plan is read (text sources or prepared
shards: a `DataInput`, `batch_source.py`); every training source is a `BatchSource`.
Everything that advances has `state_dict()` / `load_state_dict()` of plain lists, ints and dicts.
See docs/data.md.
"""

from pkmlm.data.batch_source import BatchSource, DataInput
from pkmlm.data.cleaning import Cleaner
from pkmlm.data.config import DataConfig, SourceConfig
from pkmlm.data.loader import (
    TextInput,
    TokenBatches,
    WorkerBatches,
    build_train_batches,
    check_data_config,
    data_input,
    load_or_train_tokenizer,
    resolve_data,
    stats_row,
    validation_batches,
)
from pkmlm.data.mixing import DataPlan, MixedDocuments, Source, SourceStream, resolve_sources
from pkmlm.data.packing import Packer, ShuffleBuffer
from pkmlm.data.prepared import PreparedBatches, PreparedInput, prepare
from pkmlm.data.sources import BAD_KINDS, Document, DocumentStream, HubSpec, expand_files, file_kind
from pkmlm.data.tokenizer import (
    EOS_TOKEN,
    default_cache_dir,
    encode_documents,
    eos_id,
    load_tokenizer,
    split_document,
    train_bpe,
)

__all__ = [
    "BAD_KINDS",
    "BatchSource",
    "Cleaner",
    "DataConfig",
    "DataInput",
    "DataPlan",
    "Document",
    "DocumentStream",
    "EOS_TOKEN",
    "HubSpec",
    "MixedDocuments",
    "Packer",
    "PreparedBatches",
    "PreparedInput",
    "ShuffleBuffer",
    "Source",
    "SourceConfig",
    "SourceStream",
    "TextInput",
    "TokenBatches",
    "WorkerBatches",
    "build_train_batches",
    "check_data_config",
    "data_input",
    "default_cache_dir",
    "encode_documents",
    "eos_id",
    "expand_files",
    "file_kind",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "prepare",
    "resolve_data",
    "resolve_sources",
    "split_document",
    "stats_row",
    "train_bpe",
    "validation_batches",
]
