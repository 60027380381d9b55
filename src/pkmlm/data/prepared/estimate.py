"""What `pkmlm-prepare` will write, estimated before it starts: tokens and bytes per source."""

from __future__ import annotations

import io
import itertools
import json
import os
import zlib
from typing import Any, Dict, Optional, Sequence, Tuple

from tokenizers import Tokenizer

from pkmlm.data.config import DataConfig
from pkmlm.data.mixing import Source
from pkmlm.data.prepared.index import token_dtype
from pkmlm.data.sources import _datasets, _open_binary, file_kind
from pkmlm.data.tokenizer import encode_documents

ESTIMATE_DOCS = 256  # documents per source that measure tokens per byte
_HEAD_BYTES = 1 << 20  # stored bytes that measure a compressed file's expansion


def _expansion(path: str) -> float:
    """Bytes of content per stored byte of `path`, from its first MB (1.0 when not compressed)."""
    if not path.endswith((".gz", ".zst")):
        return 1.0
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    cap = 64 * _HEAD_BYTES  # content measured at most: a decompression bomb stops here
    out, rest = 0, head
    try:
        if path.endswith(".gz"):  # zlib itself: a member cut off by the head still gives its content
            while rest and out < cap:
                member = zlib.decompressobj(31)
                out += len(member.decompress(rest, cap - out))
                rest = member.unused_data if member.eof else b""
        else:
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(head), read_across_frames=True) as reader:
                while out < cap and (block := reader.read(1 << 16)):  # small reads: little lost at the cut
                    out += len(block)
    except (EOFError, OSError, zlib.error, ValueError) + _zstd_errors():  # the head ends inside a frame
        pass
    return max(out / len(head), 1.0) if head and out else 1.0


def _zstd_errors() -> tuple:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def _json_text_fraction(path: str, text_field: str, records: int = ESTIMATE_DOCS) -> float:
    """UTF-8 bytes of the text field per byte of JSON line, over the file's first records."""
    text = total = 0
    try:
        with _open_binary(path) as f:
            for line in itertools.islice(f, records):
                total += len(line)
                try:
                    value = json.loads(line).get(text_field)
                except (ValueError, AttributeError):
                    continue
                if isinstance(value, str):
                    text += len(value.encode("utf-8", "replace"))
    except (OSError, EOFError, zlib.error) + _zstd_errors():
        pass
    return text / total if total and text else 1.0


def _text_bytes(source: Source) -> Tuple[Optional[int], Optional[int], int]:
    """(text bytes, documents) of a source as far as it says up front, and its stored bytes."""
    if source.hub is not None:
        try:
            builder = _datasets().load_dataset_builder(source.hub.name, source.hub.config)
            split = (builder.info.splits or {}).get(source.hub.split)
        except Exception:  # noqa: BLE001 (offline, or a dataset that states no sizes: unknown)
            split = None
        if split is None or not split.num_examples:
            return None, None, 0
        return None, split.num_examples, split.num_bytes or 0  # num_bytes counts every column: not text
    stored = sum(os.path.getsize(p) for p in source.files)
    if all(file_kind(p) == "parquet" for p in source.files):
        import pyarrow.parquet as pq

        text, docs = 0, 0
        for path in source.files:
            meta = pq.ParquetFile(path).metadata
            names = [meta.schema.column(i).name for i in range(meta.num_columns)]
            column = names.index(source.text_field) if source.text_field in names else None
            docs += meta.num_rows
            for g in range(meta.num_row_groups):
                if column is not None:
                    text += meta.row_group(g).column(column).total_uncompressed_size
        return text, docs, stored
    first = source.files[0]
    fraction = _json_text_fraction(first, source.text_field) if file_kind(first) == "json" else 1.0
    return int(stored * _expansion(first) * fraction), None, stored


def estimate(
    cfg: DataConfig, sources: Sequence[Source], tokenizer: Tokenizer, max_tokens: Optional[int] = None
) -> Dict[str, Any]:
    """What `prepare` will write, before it starts: per source its stored bytes and estimated
    tokens, the training tokens in all (capped by `max_tokens`) and the shards' bytes on disk.

    Tokens = the source's text bytes (stored size x the first MB's expansion x the share of each
    JSON line that is text; Parquet and Hub datasets state theirs) x tokens per text byte of its
    first `ESTIMATE_DOCS` documents. An estimate (cleaning drops and document-length drift are
    not seen): within about 20% on the sample corpora. None where the source states no size."""
    per_source = []
    for source in sources:
        texts = [doc.text for doc in itertools.islice(source.stream(False).documents_iter(), ESTIMATE_DOCS)]
        ids = encode_documents(tokenizer, texts, cfg.max_doc_chars) if texts else []
        tokens = sum(len(i) + 1 for i in ids)
        nbytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
        text_bytes, docs, stored = _text_bytes(source)
        if text_bytes is not None and nbytes:
            total = int(text_bytes * tokens / nbytes)
        elif docs is not None and texts:
            total = int(docs * tokens / len(texts))
        else:
            total = None
        per_source.append(
            {
                "name": source.name,
                "stored_bytes": stored,
                "documents": docs,
                "tokens": total,
                "tokens_per_doc": tokens / len(texts) if texts else None,
            }
        )
    known = all(s["tokens"] is not None for s in per_source)
    train = sum(s["tokens"] for s in per_source) if known else None
    if train is not None:
        held_out = sum(cfg.val_docs * (s["tokens_per_doc"] or 0) for s in per_source)
        train = max(int(train - held_out), 0)
    if max_tokens is not None:
        train = max_tokens if train is None else min(train, max_tokens)
    itemsize = token_dtype(tokenizer.get_vocab_size()).itemsize
    return {
        "sources": per_source,
        "train_tokens": train,
        "itemsize": itemsize,
        "disk_bytes": None if train is None else train * itemsize,
    }
