"""Document sources: which files to read, one reader per format, and a resumable stream of documents.

`expand_files` turns the config's paths and globs into a checked list of files, up front, so a
typo fails in a second rather than after tokenizer training. `DocumentStream` reads those files
(or one Hugging Face Hub dataset) in order and yields one document at a time, never holding a
whole file in memory.

The reader is chosen by extension, after stripping a compression suffix (`.gz`, `.zst`):

- `.jsonl` / `.json`: our own line-level reader, one JSON object per line (a `.json` file whose
  first character is `[` holds one JSON array and is read whole). The document is the record's
  `text_field`; a `url` field, when present, is kept. HF's JSON builder fails a whole chunk on one
  malformed line, which is why this reader is our own: a bad line is one skipped record.
- `.parquet` (never compressed as a whole: Parquet compresses its columns itself): pyarrow's
  batch reader, reading only the `text_field` column (see `ParquetReader` for why not HF's).
- `.warc.wet` / `.wet` / `.warc` (optionally `.gz`, one gzip member per record as Common Crawl
  ships them): `conversion` records read with FastWARC; the document is the record's body, its
  URL the `WARC-Target-URI` header.
- anything else: plain UTF-8 text, **documents separated by blank lines** (lines holding only
  ASCII whitespace count as blank; runs of them are one separator). This is the usual convention
  of pretraining text dumps (BERT's input format, for one); a file without blank lines is one
  document, held in memory while it is read. Line breaks inside a document are kept (`\\r\\n` and
  `\\r` become `\\n`); the newline that ends its last line is dropped.
- a Hub dataset (`SourceConfig.hub`): `datasets.load_dataset(name, config, split=split,
  streaming=True)`, the call HF's builders make for local files too.

Bad input (see `BAD_KINDS`): a record that cannot give a document is skipped and counted in
`stats` by kind; a file that breaks off (truncated or corrupt compression, a WARC record shorter
than its Content-Length) counts once and ends there; a file that cannot be opened counts as
`unreadable`. With `strict=True` the first of any of these is a `DataError` naming the file and
the line (or record / row). Empty documents are skipped and counted as `empty` in both modes
(they would add nothing but an EOS).

Sharding: `DocumentStream.stride(offset, n)` makes the stream keep only the records whose index
(counted from the call, over all files in order) is `offset` mod `n`; the others are passed over
without being decoded (JSON lines are not even parsed), so each of n readers decodes and
tokenizes only its share while every record is read by exactly one of them.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import itertools
import json
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from pkmlm.data.config import MAX_RECORD_BYTES
from pkmlm.errors import DataError
from pkmlm.paths import file_problem

# Kinds of bad input, counted in `DocumentStream.stats` (each a record skipped, or for the last
# three a file broken off or left out).
BAD_KINDS = (
    "malformed_json",  # a JSON line that does not parse, or is not an object
    "non_utf8",  # bytes that are not UTF-8 (or a JSON string with a lone surrogate escape)
    "missing_field",  # no text field, or null
    "non_string",  # a text field that is not a string
    "empty",  # an empty text
    "too_long",  # a record over data.max_record_bytes (read no further than that, then skipped)
    "truncated",  # compressed data that breaks off or is corrupt; a WARC record cut short
    "unreadable",  # a file that cannot be opened or parsed at all (e.g. a damaged Parquet footer)
    "empty_file",  # a file with no record at all (e.g. a 0-byte .gz)
)

# Compression suffixes that wrap any of the formats below.
_COMPRESSIONS = (".gz", ".zst")


# ----------------------------------------------------------------------------------------------
# Which files
# ----------------------------------------------------------------------------------------------


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _check_readable(path: str, pattern: str, key: str = "data.files") -> None:
    """A regular file this user may read, checked with stat() alone: opening a FIFO would block for
    ever and a device such as /dev/zero never ends (pkmlm.paths)."""
    where = path if path == pattern else f"{path} (from {key} pattern {pattern!r})"
    if os.path.isdir(path):
        raise DataError(
            f"data file {where} is a directory; give files or a glob such as '{pattern.rstrip('/')}/*.jsonl'"
        )
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"data file {where} cannot be read: {problem}; give regular files in {key}")
    if file_kind(path) == "parquet" and path.lower().endswith(_COMPRESSIONS):
        # Parquet is read by seeking to its footer, which a gzip/zstd stream cannot do; its columns
        # are compressed inside the file anyway.
        raise DataError(
            f"data file {where} is a compressed Parquet file: give the .parquet file itself "
            "(Parquet compresses its columns internally)"
        )
    if path.endswith(".zst") and importlib.util.find_spec("zstandard") is None:
        raise DataError(f"data file {where} is zstd-compressed: reading it needs `pip install zstandard`")
    if file_kind(path) == "wet" and importlib.util.find_spec("fastwarc") is None:
        raise DataError(f"data file {where} is a WARC/WET file: reading it needs `pip install fastwarc`")


def expand_files(patterns: Sequence[str], key: str = "data.files") -> List[str]:
    """Expand `data.files` into absolute file paths: `~`, globs (`**` recursive), relative paths.

    Each pattern's matches are sorted; patterns keep their order; a file named twice is kept at its
    first place. Directories matched by a glob are left out; a pattern that matches no file, a
    directory named as a file, or an unreadable file raises a `DataError` naming it.
    """
    if isinstance(patterns, str):  # a single path given where a list was expected
        patterns = [patterns]
    if not patterns:
        raise DataError(f"{key} is empty: give at least one path or glob, e.g. {key}=[corpus/*.jsonl.gz]")
    files: List[str] = []
    seen = set()
    for pattern in patterns:
        pattern = str(pattern)
        expanded = os.path.abspath(os.path.expanduser(pattern))
        if _has_glob(pattern) and not os.path.exists(expanded):  # a literal name like "a[1].txt" wins
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if not os.path.isdir(p))
            if not matches:
                raise DataError(
                    f"{key} pattern {pattern!r} matches no file (looked for {expanded}); "
                    "check the path, or set paths.sample_dir / PKMLM_SAMPLE_DIR for the sample data"
                )
        else:
            if not os.path.exists(expanded):
                raise DataError(
                    f"data file {pattern!r} does not exist (looked for {expanded}); check the path in {key}"
                )
            matches = [expanded]
        for path in matches:
            _check_readable(path, pattern, key)
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


# ----------------------------------------------------------------------------------------------
# Readers: each has `records(path)`, yielding raw records cheaply (a JSON line is not parsed yet),
# and `decode(raw)`, giving a Document or the kind of bad input it is. `where(index)` names a
# record's place in the file for error messages.
# ----------------------------------------------------------------------------------------------


class Document(NamedTuple):
    text: str
    url: Optional[str] = None  # the record's URL where the format has one (WET, C4's `url`)


def file_kind(path: str) -> str:
    """The reader for `path`: "json", "parquet", "wet" or "text" (by extension, compression stripped)."""
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith((".jsonl", ".json")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".wet", ".warc")):
        return "wet"
    return "text"


_hf_datasets = None


def _datasets():
    """HF `datasets`, imported on first use (it is slow to import) with its progress bars and
    logging silenced: our errors are one line on stderr, never their log lines."""
    global _hf_datasets
    if _hf_datasets is None:
        import logging

        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity(logging.CRITICAL)
        _hf_datasets = datasets
    return _hf_datasets


class _ZstdReader(io.RawIOBase):
    """Zstandard frames (one or several, concatenated) as a byte stream that, unlike zstandard's
    own stream_reader, raises EOFError when the data ends inside a frame (a truncated file)."""

    def __init__(self, path: str):
        import zstandard

        self._zstd = zstandard
        self._file = open(path, "rb")
        self._decoder = zstandard.ZstdDecompressor().decompressobj()
        self._out = b""
        self._started = False  # any compressed input fed to the current frame

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            chunk = self._file.read(1 << 17)
            if not chunk:
                if self._started and not self._decoder.eof:
                    raise EOFError("zstd data ends inside a frame")
                return 0
            while chunk:
                if self._decoder.eof:  # the next frame follows
                    self._decoder = self._zstd.ZstdDecompressor().decompressobj()
                self._started = True
                self._out += self._decoder.decompress(chunk)
                chunk = self._decoder.unused_data if self._decoder.eof else b""
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


class _TooLong:
    """The raw record a reader gives for a record over its byte limit (read no further)."""

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = _TooLong()


def bounded_lines(f: io.BufferedIOBase, limit: int) -> Iterator[Any]:
    """The lines of the binary file `f`, none read further than `limit` bytes: a longer line is
    passed over in 1 MiB pieces and given as `TOO_LONG`, so that no line (a corrupt file without
    newlines, a 200 MB JSON record) is ever held whole in memory."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield TOO_LONG
        else:
            yield line


def _text_value(value: Any, url: Any = None) -> Tuple[Optional[Document], Optional[str]]:
    """A record's text field value as a Document, or the kind of bad input it is."""
    if isinstance(value, str):
        if not value:
            return None, "empty"
        return Document(value, url if isinstance(url, str) else None), None
    return None, "missing_field" if value is None else "non_string"


class Reader:
    unit = "record"

    def __init__(self, text_field: str, max_bytes: int):
        self.text_field = text_field
        self.max_bytes = max_bytes  # data.max_record_bytes: longer records are TOO_LONG

    def records(self, path: str) -> Iterator[Any]:
        raise NotImplementedError

    def decode(self, raw: Any) -> Tuple[Optional[Document], Optional[str]]:
        """(document, None), or (None, bad kind), or (None, None) for a record to pass over silently."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        return f"{self.unit} {index + 1}"


class JsonLinesReader(Reader):
    unit = "line"

    def __init__(self, text_field: str, max_bytes: int):
        super().__init__(text_field, max_bytes)
        self.path = ""
        self.absent_from: Optional[List[str]] = None  # fields of the last record lacking text_field

    def records(self, path: str) -> Iterator[Any]:
        self.path = path
        with _open_binary(path) as f:
            head = f.peek(64)[:64] if hasattr(f, "peek") else b""
            if head.lstrip()[:1] == b"[":  # one JSON array: read whole (it cannot be streamed by line)
                self.unit = "array item"
                data = f.read(self.max_bytes + 1)
                if len(data) > self.max_bytes:
                    yield TOO_LONG  # the whole array is one record too long to read
                    return
                try:
                    items = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    yield b"\x00not json"  # counted as one malformed record
                    return
                yield from ((item,) for item in items)  # a 1-tuple: already parsed
                return
            yield from bounded_lines(f, self.max_bytes)

    def decode(self, raw: Any) -> Tuple[Optional[Document], Optional[str]]:
        if isinstance(raw, tuple):
            record = raw[0]
        else:
            if not raw.strip():
                return None, None  # a blank line is no record
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return None, "non_utf8"
            try:
                record = json.loads(line)
            except ValueError:
                return None, "malformed_json"
        if not isinstance(record, dict):
            return None, "malformed_json"
        if self.text_field not in record:
            self.absent_from = sorted(record)
        value = record.get(self.text_field)
        if isinstance(value, str) and not value.isascii():
            try:  # a "\\udc80" escape is valid JSON but no UTF-8 text: the tokenizer would refuse it
                value.encode("utf-8")
            except UnicodeEncodeError:
                return None, "non_utf8"
        return _text_value(value, record.get("url"))


class TextReader(Reader):
    """Blank-line separated documents; a raw record is (first line number, [line bytes])."""

    unit = "line"

    def records(self, path: str) -> Iterator[Any]:
        with _open_binary(path) as f:
            lines: List[bytes] = []
            size = 0  # bytes in `lines`; a paragraph over max_bytes is dropped whole (TOO_LONG)
            start = 0
            for number, line in enumerate(bounded_lines(f, self.max_bytes)):
                if line is not TOO_LONG and not line.strip():  # a blank line ends the paragraph
                    if size:
                        yield (start, lines) if lines else TOO_LONG
                    lines, size = [], 0
                    continue
                if not size:
                    start = number
                if line is TOO_LONG or size + len(line) > self.max_bytes:
                    lines, size = [], self.max_bytes + 1  # passed over up to the next blank line
                elif lines or not size:
                    lines.append(line)
                    size += len(line)
            if size:
                yield (start, lines) if lines else TOO_LONG

    def decode(self, raw: Any) -> Tuple[Optional[Document], Optional[str]]:
        _, lines = raw
        try:
            text = b"".join(lines).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return Document(text[:-1] if text.endswith("\n") else text), None

    def where(self, index: int) -> str:
        return f"paragraph {index + 1}"


class WetReader(Reader):
    """Common Crawl WET: `conversion` records (extracted plain text) with their WARC-Target-URI."""

    unit = "conversion record"

    def records(self, path: str) -> Iterator[Any]:
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        with open(path, "rb") as f:  # FastWARC detects gzip (one member per record) itself
            for record in ArchiveIterator(f, record_types=WarcRecordType.conversion, parse_http=False):
                if record.content_length > self.max_bytes:
                    yield TOO_LONG  # its body is not read
                    continue
                body = record.reader.read()
                if record.headers.get("Content-Length") is None:  # mandatory in WARC: the headers broke off
                    raise EOFError("WARC record headers break off (no Content-Length)")
                if len(body) < record.content_length:
                    raise EOFError(f"WARC record ends after {len(body)} of its {record.content_length} bytes")
                yield record.headers.get("WARC-Target-URI"), body

    def decode(self, raw: Any) -> Tuple[Optional[Document], Optional[str]]:
        url, body = raw
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
        return _text_value(text.strip(), url)


class ParquetReader(Reader):
    unit = "row"

    def records(self, path: str) -> Iterator[Any]:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if self.text_field not in names:
            raise DataError(
                f"data file {path} has no column {self.text_field!r} (data.text_field); its columns are "
                f"{names}: set data.text_field to one of them"
            )
        # pyarrow's own batch reader (which HF's Parquet builder wraps), not HF's streaming
        # dataset: inside a DataLoader worker that one splits its files among the workers on its
        # own, which would silently drop records from our per-record sharding.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[self.text_field]):
            yield from batch.column(0).to_pylist()

    def decode(self, raw: Any) -> Tuple[Optional[Document], Optional[str]]:
        return _text_value(raw)


@dataclass
class HubSpec:
    """A Hugging Face Hub dataset, streamed: `datasets.load_dataset(name, config, split=split, streaming=True)`."""

    name: str
    config: Optional[str] = None
    split: str = "train"

    def __str__(self) -> str:
        return f"hub:{self.name}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"


def open_hub_dataset(spec: HubSpec):
    """The streaming dataset, or a one-line DataError (offline, unknown name, no such split)."""
    datasets = _datasets()
    try:
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except Exception as e:  # ConnectionError offline, FileNotFoundError / DatasetNotFoundError, ValueError split
        detail = " ".join(str(e).split())[:240]
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or "offline" in detail.lower()
        hint = (
            (
                "the Hub is not reachable from here (HF_HUB_OFFLINE or no network): download the files and "
                "give them as data.files, or run where the Hub is reachable"
            )
            if offline
            else ("check the dataset name, hub_config and split, or give local files as data.files")
        )
        raise DataError(
            f"cannot open Hub dataset {spec.name!r} (config {spec.config!r}, split "
            f"{spec.split!r}): {type(e).__name__}: {detail}; {hint}"
        ) from None


def _outside_worker_sharding(dataset) -> Iterator[Any]:
    """Iterate a HF streaming dataset as a whole, also inside a DataLoader worker.

    HF's IterableDataset asks `torch.utils.data.get_worker_info()` when its iteration starts and,
    in a worker, yields only the worker's share of its shards. We shard by record ourselves, so
    that first call is answered with "not a worker" (the worker process is single-threaded; the
    real function is back before any other code runs)."""
    it = iter(dataset)
    data_module = sys.modules.get("torch.utils.data")
    if data_module is None or data_module.get_worker_info() is None:
        yield from it
        return
    real = data_module.get_worker_info
    data_module.get_worker_info = lambda: None
    try:
        first = next(it, _END)
    finally:
        data_module.get_worker_info = real
    if first is _END:
        return
    yield first
    yield from it


_END = object()


class HubReader(Reader):
    """Records of a Hub dataset; resumes through the dataset's own `state_dict()` (shard and
    offset), so a restart does not stream the dataset again from its beginning."""

    unit = "example"

    def __init__(self, text_field: str, max_bytes: int, spec: HubSpec):
        super().__init__(text_field, max_bytes)
        self.spec = spec
        self.dataset = None

    def open(self, resume_state: Optional[Dict[str, Any]]):
        self.dataset = open_hub_dataset(self.spec)
        if resume_state is not None:
            self.dataset.load_state_dict(resume_state)
        return self.dataset

    def records(self, path: str) -> Iterator[Any]:
        dataset = self.dataset if self.dataset is not None else self.open(None)
        for i, record in enumerate(_outside_worker_sharding(dataset)):
            if i == 0 and self.text_field not in record:
                raise DataError(
                    f"Hub dataset {path} has no field {self.text_field!r} (data.text_field); "
                    f"its fields are {sorted(record)}: set the source's text_field"
                )
            yield record.get(self.text_field), record.get("url")

    def decode(self, raw: Any) -> Tuple[Optional[Document], Optional[str]]:
        return _text_value(*raw)


_READERS = {"json": JsonLinesReader, "parquet": ParquetReader, "wet": WetReader, "text": TextReader}


def _broken_kind(e: BaseException) -> str:
    """A file that broke off mid-way: truncated/corrupt compression, or unreadable."""
    zstd_error = None
    if importlib.util.find_spec("zstandard") is not None:
        import zstandard

        zstd_error = zstandard.ZstdError
    if isinstance(e, (EOFError, zlib.error)) or (zstd_error is not None and isinstance(e, zstd_error)):
        return "truncated"
    return "unreadable"


# ----------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------


def _message(kind: str, path: str, where: str, text_field: str) -> str:
    what = {
        "malformed_json": "is not a JSON object",
        "non_utf8": "is not valid UTF-8",
        "missing_field": f"has no field {text_field!r} (data.text_field)",
        "non_string": f"has a field {text_field!r} (data.text_field) that is not a string",
        "empty": "is empty",
        "too_long": "is longer than data.max_record_bytes (raise it, or clean the file)",
    }[kind]
    return (
        f"data file {path}, {where}: the record {what}; fix the file, or set data.strict=false to skip "
        "and count such records"
    )


class DocumentStream:
    """Documents over `files` (or one Hub dataset), in order, one pass; resumable.

    The position is (file index, record index within that file), counting skipped records too,
    and `records`, the number of records passed over all files (what striding counts). Iterating
    continues from the current position; `state_dict()` taken between two documents and loaded
    into a fresh stream makes it yield exactly the next document. Resuming inside a file passes
    over that file's records up to the position without decoding them (a Hub dataset resumes from
    its own state instead).

    `__iter__` yields texts; `documents()` yields `Document(text, url)`.
    """

    def __init__(
        self,
        files: Sequence[str],
        text_field: str = "text",
        strict: bool = False,
        hub: Optional[HubSpec] = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ):
        self.hub = hub
        self.max_record_bytes = max_record_bytes
        self.files = [str(hub)] if hub is not None else list(files)
        self.text_field = text_field
        self.strict = strict
        self.file_index = 0
        self.record_index = 0  # records of files[file_index] already passed
        self.records = 0  # records passed in all, this pass
        self.documents = 0  # documents yielded so far (across resumes)
        self.stats: Dict[str, int] = {}
        self._stride: Optional[Tuple[int, int, int]] = None  # (start record, offset, n)
        self._hub_reader: Optional[HubReader] = None
        self._hub_resume: Optional[Dict[str, Any]] = None

    def stride(self, offset: int, n: int) -> None:
        """From the current position on, keep only records whose index counted from here is offset mod n."""
        if not 0 <= offset < n:
            raise ValueError(f"need 0 <= offset < n, got offset={offset}, n={n}")
        self._stride = (self.records, offset, n)

    def _count(self, kind: str, path: str, where: str) -> None:
        if self.strict and kind != "empty":  # an empty text is no error, only nothing to learn from
            raise DataError(_message(kind, path, where, self.text_field))
        self.stats[kind] = self.stats.get(kind, 0) + 1

    def _count_file(self, kind: str, path: str, where: str, detail: str) -> None:
        if self.strict:
            hint = {
                "truncated": "the compressed data breaks off or is corrupt",
                "unreadable": "it cannot be read",
                "empty_file": "it holds no record",
            }[kind]
            raise DataError(
                f"data file {path}, {where}: {hint} ({detail}); fix or remove the file, or set "
                "data.strict=false to skip and count it"
            )
        self.stats[kind] = self.stats.get(kind, 0) + 1

    def _reader(self) -> Reader:
        if self.hub is not None:
            if self._hub_reader is None:
                self._hub_reader = HubReader(self.text_field, self.max_record_bytes, self.hub)
                self._hub_reader.open(self._hub_resume)
            return self._hub_reader
        return _READERS[file_kind(self.files[self.file_index])](self.text_field, self.max_record_bytes)

    def __iter__(self) -> Iterator[str]:
        for doc in self.documents_iter():
            yield doc.text

    def documents_iter(self) -> Iterator[Document]:
        while self.file_index < len(self.files):
            path = self.files[self.file_index]
            reader = self._reader()
            records = reader.records(path)
            skip = 0 if (self.hub is not None and self._hub_resume is not None) else self.record_index
            try:
                for raw in itertools.islice(records, skip, None):
                    index = self.record_index
                    self.record_index += 1
                    self.records += 1
                    if self._stride is not None:
                        start, offset, n = self._stride
                        if (self.records - 1 - start) % n != offset:
                            continue
                    doc, bad = (None, "too_long") if raw is TOO_LONG else reader.decode(raw)
                    if doc is not None and len(doc.text) > self.max_record_bytes:  # Parquet, Hub: read whole
                        doc, bad = None, "too_long"
                    if doc is not None:
                        self.documents += 1
                        yield doc
                    elif bad is not None:
                        if index == 0 and bad == "missing_field" and getattr(reader, "absent_from", None):
                            # A file whose first record lacks the field: a misnamed field, not a bad record.
                            raise DataError(
                                f"data file {path} has no field {self.text_field!r} (data.text_field); its first "
                                f"record's fields are {reader.absent_from}: set data.text_field to one of them"
                            )
                        self._count(bad, path, reader.where(index))
            except DataError:
                raise
            except Exception as e:  # broken compression (zlib, zstd, EOF), Arrow errors, OS errors
                kind = _broken_kind(e)
                if kind == "unreadable" and not isinstance(e, (OSError, ValueError)):
                    raise  # not bad input: a bug
                detail = " ".join(str(e).split())[:200] or type(e).__name__
                self._count_file(
                    kind,
                    path,
                    f"after {reader.where(self.record_index - 1)}" if self.record_index else "at its start",
                    f"{type(e).__name__}: {detail}",
                )
            else:
                if self.record_index == 0 and self.hub is None:
                    self._count_file("empty_file", path, "at its start", "no records")
            self.file_index += 1
            self.record_index = 0
            self._hub_resume = None

    def state_dict(self) -> Dict[str, Any]:
        state = {
            "file_index": self.file_index,
            "record_index": self.record_index,
            "records": self.records,
            "documents": self.documents,
            "stats": dict(self.stats),
            "n_files": len(self.files),
            "stride": list(self._stride) if self._stride is not None else None,
        }
        if self.hub is not None:
            dataset = self._hub_reader.dataset if self._hub_reader is not None else None
            state["hub"] = dataset.state_dict() if dataset is not None else self._hub_resume
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("n_files", len(self.files)) != len(self.files):
            raise DataError(
                f"cannot resume the data stream: the checkpoint read {state['n_files']} files, data.files "
                f"now gives {len(self.files)}; resume with the same data.files"
            )
        self.file_index = int(state["file_index"])
        self.record_index = int(state["record_index"])
        self.records = int(state.get("records", 0))
        self.documents = int(state.get("documents", 0))
        self.stats = {k: int(v) for k, v in state.get("stats", {}).items()}
        stride = state.get("stride")
        self._stride = tuple(int(x) for x in stride) if stride is not None else None
        self._hub_reader = None
        self._hub_resume = state.get("hub") if self.record_index > 0 else None
