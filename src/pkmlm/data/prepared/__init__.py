"""Pre-tokenized shards: `pkmlm-prepare` writes them once, `data=prepared` trains from them fast.

Directory layout (`out=DIR`):

    index.json        format, dtype, eos_id, vocab size, the shards of each split with their token
                      and document counts and SHA-256, skipped-record counts, the data config
    tokenizer.json    the tokenizer the ids belong to (training loads this one)
    train_00000.bin   token ids, raw little-endian uint16 when the vocabulary fits (<= 65,536
    train_00001.bin   ids), else uint32; read with np.memmap, never loaded whole
    val_00000.bin     the validation split (the first data.val_docs documents of each source)

Each shard holds the packer's token stream `EOS d1 EOS d2 ... dn EOS` (leading EOS, an EOS after
every document, as `Packer` builds it), so the validation windows read from `val_00000.bin` are
exactly those `validation_batches` packs from the text.
Writing is resumable and byte-identical after an interruption (`writer`).

Modules: `index` (the format's names and checks, shared), `estimate` (what a prepare will write,
before it starts), `writer` (`prepare`: resumable, see there), `reader` (`PreparedBatches`, the
validation split, `PreparedInput`: the directory as a data input of training and evaluation).
"""

from pkmlm.data.prepared.estimate import ESTIMATE_DOCS, estimate
from pkmlm.data.prepared.index import (
    FORMAT,
    INDEX,
    check_index,
    load_index,
    load_prepared_tokenizer,
    open_shards,
    token_dtype,
)
from pkmlm.data.prepared.reader import PreparedBatches, PreparedInput, prepared_validation_windows
from pkmlm.data.prepared.writer import check_out, partial_dir, partial_tokenizer, prepare

__all__ = [
    "ESTIMATE_DOCS",
    "FORMAT",
    "INDEX",
    "PreparedBatches",
    "PreparedInput",
    "check_index",
    "check_out",
    "estimate",
    "load_index",
    "load_prepared_tokenizer",
    "open_shards",
    "partial_dir",
    "partial_tokenizer",
    "prepare",
    "prepared_validation_windows",
    "token_dtype",
]
