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
exactly those `validation_batches` packs from the text. Training documents are one pass over
each source after its validation documents, cleaned, interleaved by weight (seeded) until every
source is used up (or `max_tokens` training tokens are written).

Writing is resumable. Everything goes to `DIR.partial/` first; a training shard closes at the
first encode chunk (`data.encode_batch_docs` documents) that brings it to `shard_tokens` tokens,
and then `DIR.partial/progress.json` records the closed shards and the reading position (each
source's stream state, the interleave RNG). Rerunning the same command after an interruption
(Ctrl-C, kill -9, a full disk) continues from the last closed shard: the output is byte-identical
to an uninterrupted run. When done, `DIR.partial` becomes `DIR` in one rename.

Reading checks before any batch: `load_index` checks the index's structure and the shards' sizes
(cheap, at start-up); `open_shards` reads each shard once and checks its SHA-256 and that every
id is below the vocabulary size (about 1 s per GB, shards in parallel), so a damaged shard or ids
of another tokenizer are one line, never an IndexError in the embedding at step 1.

Training windows (`PreparedBatches`) are `seq_len + 1` tokens at stride `seq_len` inside each
shard (a shard's last partial window is not used: under seq_len tokens per shard of
`shard_tokens`). Each epoch orders all windows of all shards either `sequential`ly or by a seeded
random permutation (the same on every rank; epochs after the first also shift every window start
by a seeded offset in [0, seq_len), so the windows themselves change); rank r takes positions r,
r + world_size, ... of that order, so the ranks' windows are disjoint and together complete.
The state is (epoch, position): plain ints, exact on resume.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import random
import re
import uuid
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tokenizers import Tokenizer

from pkmlm.data.config import DataConfig
from pkmlm.data.mixing import Source, SourceStream, validation_documents
from pkmlm.data.sources import _datasets, _open_binary, file_kind
from pkmlm.data.tokenizer import encode_documents, eos_id, load_tokenizer
from pkmlm.errors import DataError

FORMAT = "pkmlm-prepared/2"  # /2: shards carry their SHA-256
INDEX = "index.json"
PROGRESS = "progress.json"  # in DIR.partial while writing: closed shards and the reading position
MARKER = ".pkmlm-prepare"  # marks DIR.partial as ours (it may be removed and rewritten)
_SHARD_NAME = re.compile(r"(train|val)_\d{5}\.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERIFY_BLOCK = 1 << 24  # bytes per read when verifying a shard


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 2^16), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------
# The index: structure, sizes, checksums
# ----------------------------------------------------------------------------------------------


def _prepare_again(directory: str) -> str:
    return f"prepare it again (pkmlm-prepare ... out={directory})"


def check_index(index: Any, directory: str, path: str) -> None:
    """Every field the readers use, with its type and range; a DataError naming the first bad one."""

    def bad(what: str) -> DataError:
        return DataError(
            f"data.prepared={directory!r}: {path} is not a valid pkmlm-prepare index ({what}); "
            + _prepare_again(directory)
        )

    if not isinstance(index, dict):
        raise bad(f"a JSON {type(index).__name__}, not an object")
    if index.get("format") != FORMAT:
        raise DataError(
            f"data.prepared={directory!r}: format {index.get('format')!r}, this code reads {FORMAT}; "
            + _prepare_again(directory)
        )

    def integer(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    tokenizer = index.get("tokenizer")
    for key, ok, allowed in (
        ("id", isinstance(index.get("id"), str), "a string"),
        ("dtype", index.get("dtype") in ("uint16", "uint32"), "uint16 or uint32"),
        ("vocab_size", integer(index.get("vocab_size"), 1), "an integer >= 1"),
        (
            "tokenizer",
            isinstance(tokenizer, str)
            and tokenizer not in ("", ".", "..")
            and os.path.basename(tokenizer) == tokenizer,
            "a file name inside the directory",
        ),
        ("splits", isinstance(index.get("splits"), dict), "an object with train and val lists"),
    ):
        if not ok:
            raise bad(f"{key}={index.get(key)!r}: expected {allowed}")
    vocab = index["vocab_size"]
    if not (integer(index.get("eos_id"), 0) and index["eos_id"] < vocab):
        raise bad(f"eos_id={index.get('eos_id')!r}: expected an integer in [0, vocab_size={vocab})")
    if index["dtype"] == "uint16" and vocab > 1 << 16:
        raise bad(f"dtype={index['dtype']!r} cannot hold ids of vocab_size={vocab}")
    for split in ("train", "val"):
        shards = index["splits"].get(split)
        if not isinstance(shards, list):
            raise bad(f"splits.{split}={shards!r}: expected a list of shards")
        for i, shard in enumerate(shards):
            where = f"splits.{split}[{i}]"
            if not isinstance(shard, dict):
                raise bad(f"{where}={shard!r}: expected an object")
            if not (
                isinstance(shard.get("file"), str)
                and _SHARD_NAME.fullmatch(shard["file"])
                and shard["file"].startswith(split)
            ):
                raise bad(f"{where}.file={shard.get('file')!r}: expected {split}_NNNNN.bin")
            for key in ("tokens", "documents"):
                if not integer(shard.get(key), 0):
                    raise bad(f"{where}.{key}={shard.get(key)!r}: expected an integer >= 0")
            if not (isinstance(shard.get("sha256"), str) and _SHA256.fullmatch(shard["sha256"])):
                raise bad(f"{where}.sha256={shard.get('sha256')!r}: expected 64 hex digits")


def load_index(directory: str) -> Dict[str, Any]:
    """The prepared directory's index, checked (structure, shard sizes; not yet the checksums),
    or a DataError naming `data.prepared` and what to do."""
    path = os.path.join(os.path.abspath(os.path.expanduser(directory)), INDEX)
    if not os.path.isfile(path):
        raise DataError(
            f"data.prepared={directory!r}: no {INDEX} there ({path}); write the directory with "
            "pkmlm-prepare data=... out=DIR first"
        )
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = " ".join(str(e).split())[:200]
        raise DataError(
            f"data.prepared={directory!r}: {path} cannot be read ({detail}); " + _prepare_again(directory)
        ) from None
    check_index(index, directory, path)
    base = os.path.dirname(path)
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in ("train", "val"):
        for shard in index["splits"][split]:
            shard_path = os.path.join(base, shard["file"])
            expected = shard["tokens"] * itemsize
            if not os.path.isfile(shard_path) or os.path.getsize(shard_path) != expected:
                raise DataError(
                    f"data.prepared={directory!r}: shard {shard['file']} is missing or not "
                    f"{expected} bytes; " + _prepare_again(directory)
                )
    return index


def load_prepared_tokenizer(directory: str, index: Optional[Dict[str, Any]] = None) -> Tuple[Tokenizer, str]:
    """The tokenizer the directory's token ids belong to, and its path."""
    index = index or load_index(directory)
    path = os.path.join(os.path.abspath(os.path.expanduser(directory)), index["tokenizer"])
    tok = load_tokenizer(path, key="data.prepared")
    if tok.get_vocab_size() != index["vocab_size"]:
        raise DataError(
            f"data.prepared={directory!r}: {index['tokenizer']} has {tok.get_vocab_size()} tokens, "
            f"{INDEX} says the ids are of a {index['vocab_size']}-token vocabulary; " + _prepare_again(directory)
        )
    return tok, path


def _verify_shard(path: str, shard: Dict[str, Any], dtype: np.dtype, vocab: int) -> Optional[str]:
    """What is wrong with one shard (its SHA-256, an id >= vocab), or None."""
    digest, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while block := f.read(_VERIFY_BLOCK - _VERIFY_BLOCK % dtype.itemsize):
            digest.update(block)
            ids = np.frombuffer(block, dtype=dtype.newbyteorder("<"))
            if len(ids):
                top = max(top, int(ids.max()))
    if digest.hexdigest() != shard["sha256"]:
        return f"shard {shard['file']} does not match its SHA-256 in {INDEX} (the file is damaged)"
    if top >= vocab:
        return (
            f"shard {shard['file']} holds token id {top}, outside the vocabulary of {vocab} tokens "
            f"({INDEX} and its tokenizer do not belong to these shards)"
        )
    return None


def open_shards(directory: str, split: str, index: Optional[Dict[str, Any]] = None) -> List[np.memmap]:
    """The split's shards as read-only memmaps, each verified first (SHA-256 and id range)."""
    index = index or load_index(directory)
    base = os.path.abspath(os.path.expanduser(directory))
    dtype = np.dtype(index["dtype"])
    shards = [s for s in index["splits"][split] if s["tokens"] > 0]
    paths = [os.path.join(base, s["file"]) for s in shards]
    # hashlib and numpy release the GIL on large buffers: a thread per shard reads them in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(lambda a: _verify_shard(*a, dtype, index["vocab_size"]), zip(paths, shards)))
    for problem in problems:
        if problem is not None:
            raise DataError(f"data.prepared={directory!r}: {problem}; " + _prepare_again(directory))
    return [np.memmap(p, dtype=dtype, mode="r", shape=(s["tokens"],)) for p, s in zip(paths, shards)]


# ----------------------------------------------------------------------------------------------
# Estimates, before any work
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends documents' ids to `{split}_{k:05d}.bin` files, every shard starting with EOS and every
    document followed by EOS; `close()` ends the current shard and records its SHA-256."""

    def __init__(
        self, directory: str, split: str, dtype: np.dtype, eos: int, closed: Optional[List[Dict[str, Any]]] = None
    ):
        self.directory, self.split, self.eos = directory, split, eos
        self.dtype = dtype.newbyteorder("<")
        self.shards: List[Dict[str, Any]] = [dict(s) for s in closed or []]
        self._file = None
        self._hash = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def open_tokens(self) -> int:
        return self.shards[-1]["tokens"] if self._file is not None else 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(os.path.join(self.directory, name), "wb")  # noqa: SIM115 (open until close())
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self._write(np.array([self.eos], dtype=self.dtype))

    def _write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.shards[-1]["tokens"] += len(ids)

    def add(self, docs: Sequence[Sequence[int]]) -> None:
        if self._file is None and docs:
            self._open()
        for ids in docs:
            self._write(np.array(list(ids) + [self.eos], dtype=self.dtype))
            self.shards[-1]["documents"] += 1

    def close(self) -> Optional[Dict[str, Any]]:
        """End the open shard (flushed and synced to disk); returns it, or None when none was open."""
        if self._file is None:
            return None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1]["sha256"] = self._hash.hexdigest()
        return self.shards[-1]

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _TrainingPass:
    """The training documents of every source, one pass each (after its validation documents,
    cleaned), the next source drawn by weight from those not yet used up (seeded). Resumable at
    any document boundary: `state_dict()` is plain JSON."""

    def __init__(self, sources: Sequence[Source], cfg: DataConfig):
        self.sources = list(sources)
        self.streams = [SourceStream(s, cfg) for s in self.sources]
        self.live = list(range(len(self.sources)))
        self.finished: Dict[str, Dict[str, int]] = {}  # bad-input and cleaning counts of used-up sources
        self.rng = random.Random("pkmlm-prepare")

    def next_document(self) -> Optional[str]:
        while self.live:
            weights = [self.sources[i].weight for i in self.live]
            k = self.rng.choices(range(len(self.live)), weights=weights)[0] if len(self.live) > 1 else 0
            stream = self.streams[self.live[k]]
            text = stream.next_document()
            if stream.epoch == 0:
                return text
            # The source is used up: what it returned opens its next pass, which is not written.
            self.finished[stream.source.name] = stream.stats
            del self.live[k]
        return None

    def counts(self) -> Dict[str, Dict[str, int]]:
        live = {self.sources[i].name: self.streams[i].stats for i in self.live}
        return {s.name: {**self.finished, **live}.get(s.name, {}) for s in self.sources}

    def state_dict(self) -> Dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "live": list(self.live),
            "finished": self.finished,
            "rng": [version, list(internal), gauss],
            "streams": {str(i): self.streams[i].state_dict() for i in self.live},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.live = [int(i) for i in state["live"]]
        self.finished = {k: {kk: int(vv) for kk, vv in v.items()} for k, v in state["finished"].items()}
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for i in self.live:
            self.streams[i].load_state_dict(state["streams"][str(i)])


def _config_dict(cfg: DataConfig) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _fingerprint(cfg: DataConfig, sources: Sequence[Source], tokenizer: Tokenizer, shard_tokens: int) -> Dict[str, Any]:
    """What makes two runs write the same bytes: resuming needs all of it unchanged."""
    data = {k: v for k, v in _config_dict(cfg).items() if k not in ("files", "sources")}
    return {
        "format": FORMAT,
        "shard_tokens": shard_tokens,
        "data": data,
        "sources": [
            {
                "name": s.name,
                "files": list(s.files),
                "hub": str(s.hub) if s.hub else None,
                "text_field": s.text_field,
                "weight": s.weight,
            }
            for s in sources
        ],
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
    }


def _differences(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        elif a != b:
            out.append(f"{key} was {a!r}, now {b!r}" if len(repr(a)) + len(repr(b)) < 160 else f"{key} differs")
    return out


def _write_json(path: str, value: Any) -> None:
    """Write atomically: readers (and a rerun after a crash) see the old file or the whole new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def partial_dir(out_dir: str) -> str:
    """Where `prepare` writes `out_dir` until it is complete."""
    return os.path.abspath(os.path.expanduser(out_dir)).rstrip(os.sep) + ".partial"


def partial_tokenizer(out_dir: str) -> Optional[Tokenizer]:
    """The tokenizer of an interrupted `prepare` of `out_dir` that can be continued, else None."""
    partial = partial_dir(out_dir)
    paths = [os.path.join(partial, name) for name in (MARKER, PROGRESS, "tokenizer.json")]
    if not all(os.path.isfile(p) for p in paths):
        return None
    return load_tokenizer(paths[2], key="out (interrupted prepare)")


def check_out(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"out={out_dir!r} exists and is not an empty directory; remove it or choose another out")


def _claim(partial: str):
    """Create (or reuse) `partial`, ours by its marker, and lock it against a second writer. Returns
    the open lock file (the lock lasts as long as it is open, and ends with the process)."""
    if os.path.exists(partial) and not os.path.isfile(os.path.join(partial, MARKER)):
        raise DataError(f"{partial} exists and was not written by pkmlm-prepare; remove it or choose another out")
    os.makedirs(partial, exist_ok=True)
    open(os.path.join(partial, MARKER), "a").close()
    lock = open(os.path.join(partial, ".lock"), "w")  # noqa: SIM115 (held until prepare ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DataError(
            f"another pkmlm-prepare is writing {partial} (it is locked); wait for it to finish or stop it first"
        ) from None
    return lock


Progress = Callable[[str, int, Optional[Dict[str, Any]]], None]  # (split, tokens so far, a shard just closed)


def prepare(
    cfg: DataConfig,
    sources: List[Source],
    tokenizer: Tokenizer,
    out_dir: str,
    shard_tokens: int = 100_000_000,
    tokenizer_hash: Optional[str] = None,
    progress: Optional[Progress] = None,
    max_tokens: Optional[int] = None,
) -> Dict[str, Any]:
    """Tokenize the validation and training splits of `sources` into shards under `out_dir`,
    continuing an interrupted run of the same settings (see the module docstring). Stops after
    the first encode chunk that reaches `max_tokens` training tokens, if given. Returns the index
    (with `resumed_shards`: training shards found complete when it started)."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    check_out(out_dir)
    partial = partial_dir(out_dir)
    fingerprint = _fingerprint(cfg, sources, tokenizer, shard_tokens)
    lock = _claim(partial)
    try:
        state = _resume_state(partial, fingerprint)
        if state is None:  # a fresh start: clear what an interrupted start may have left
            for name in os.listdir(partial):
                if name not in (MARKER, ".lock"):
                    os.remove(os.path.join(partial, name))
            tokenizer.save(os.path.join(partial, "tokenizer.json"))
        try:
            index = _write(cfg, sources, tokenizer, partial, shard_tokens, fingerprint, state, progress, max_tokens)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            done = len((_resume_state(partial, fingerprint) or {}).get("train", []))
            raise DataError(
                f"no space left on the device of {partial} ({e.strerror}); {done} complete training "
                "shards are kept there: free space and rerun the same command to continue"
            ) from None
        index["tokenizer_hash"] = tokenizer_hash
        resumed = index.pop("resumed_shards")
        _write_json(os.path.join(partial, INDEX), index)
        for name in (PROGRESS, MARKER, ".lock"):
            os.remove(os.path.join(partial, name))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(partial, out_dir)
    finally:
        lock.close()
    return {**index, "resumed_shards": resumed}


def _resume_state(partial: str, fingerprint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The progress of an interrupted run with these settings, or None when there is none."""
    path = os.path.join(partial, PROGRESS)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
        saved = state["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # written atomically, so only a foreign file gets here: start afresh
    changed = _differences(saved, fingerprint)
    if changed:
        raise DataError(
            f"{partial} holds an interrupted pkmlm-prepare with other settings ("
            + "; ".join(changed[:3])
            + "); rerun it with its settings to continue it, or remove the directory to start afresh"
        )
    return state


def _write(
    cfg: DataConfig,
    sources: List[Source],
    tokenizer: Tokenizer,
    partial: str,
    shard_tokens: int,
    fingerprint: Dict[str, Any],
    state: Optional[Dict[str, Any]],
    progress: Optional[Progress],
    max_tokens: Optional[int],
) -> Dict[str, Any]:
    vocab = tokenizer.get_vocab_size()
    dtype, eos = token_dtype(vocab), eos_id(tokenizer)
    report = progress or (lambda split, tokens, shard: None)

    def chunks(next_text: Callable[[], Optional[str]]) -> Iterator[List[str]]:
        while chunk := list(
            itertools.takewhile(lambda t: t is not None, (next_text() for _ in range(cfg.encode_batch_docs)))
        ):
            yield chunk

    if state is not None and state.get("val") is not None:
        val = state["val"]
    else:  # the validation split: small (data.val_docs per source), written whole
        writer = _ShardWriter(partial, "val", dtype, eos)
        texts = itertools.chain.from_iterable(validation_documents(s, cfg) for s in sources)
        for chunk in chunks(lambda: next(texts, None)):
            writer.add(encode_documents(tokenizer, chunk, cfg.max_doc_chars))
            report("val", writer.tokens, None)
        val = [shard for shard in [writer.close()] if shard is not None]
        state = {"fingerprint": fingerprint, "val": val, "train": [], "pass": None}
        _write_json(os.path.join(partial, PROGRESS), state)

    passing = _TrainingPass(sources, cfg)
    if state["pass"] is not None:
        passing.load_state_dict(state["pass"])
    kept = {s["file"] for s in val + state["train"]}
    for name in os.listdir(partial):  # a shard that was being written when the run was interrupted
        if _SHARD_NAME.fullmatch(name) and name not in kept:
            os.remove(os.path.join(partial, name))
    writer = _ShardWriter(partial, "train", dtype, eos, closed=state["train"])
    resumed = len(writer.shards)
    report("train", writer.tokens, None)
    stopped_by = "end of sources"
    try:
        for chunk in chunks(passing.next_document):
            writer.add(encode_documents(tokenizer, chunk, cfg.max_doc_chars))
            report("train", writer.tokens, None)
            at_limit = max_tokens is not None and writer.tokens >= max_tokens
            if writer.open_tokens >= shard_tokens or at_limit:
                shard = writer.close()
                _write_json(
                    os.path.join(partial, PROGRESS),
                    {"fingerprint": fingerprint, "val": val, "train": writer.shards, "pass": passing.state_dict()},
                )
                report("train", writer.tokens, shard)
            if at_limit:
                stopped_by = "max_tokens"
                break
        shard = writer.close()
        if shard is not None:
            report("train", writer.tokens, shard)
    finally:
        writer.abandon()
    splits = {"val": val, "train": writer.shards}
    return {
        "format": FORMAT,
        "id": uuid.uuid4().hex,
        "dtype": dtype.name,
        "eos_id": eos,
        "vocab_size": vocab,
        "tokenizer": "tokenizer.json",
        "splits": splits,
        "tokens": {k: sum(s["tokens"] for s in v) for k, v in splits.items()},
        "documents": {k: sum(s["documents"] for s in v) for k, v in splits.items()},
        "skipped": passing.counts(),
        "sources": [{"name": s.name, "weight": s.weight} for s in sources],
        "stopped_by": stopped_by,
        "max_tokens": max_tokens,
        "shard_tokens": shard_tokens,
        "resumed_shards": resumed,
        "data_config": _config_dict(cfg),
    }


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

    def __init__(self, cfg: DataConfig, directory: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
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
            raise DataError(
                f"data.prepared={directory!r} holds {n_windows} training windows of "
                f"data.seq_len={self.seq_len} + 1 tokens, fewer than the {world_size} ranks; prepare more "
                "data or lower data.seq_len"
            )

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
        return {
            "prepared": self.index["id"],
            "seq_len": self.seq_len,
            "order": self.order,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def state_dict(self) -> Dict[str, Any]:
        return {
            "kind": "prepared",
            "layout": self._layout(),
            "epoch": self.epoch,
            "position": self.position,
            "tokens": self.tokens,
            "batches": self.batches,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != "prepared":
            raise DataError(
                "cannot resume the data pipeline: the checkpoint read text sources, the config asks "
                "for data.prepared; resume with the run's saved data settings"
            )
        saved, now = state["layout"], self._layout()
        changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
        if changed:
            raise DataError(
                "cannot resume the data pipeline with a different layout: "
                + "; ".join(changed)
                + "; resume with the run's saved data settings (and the same prepared directory)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.tokens, self.batches = int(state["tokens"]), int(state["batches"])
