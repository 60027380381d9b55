"""Document sources: which files to read, and a resumable stream of document texts over them.

`expand_files` turns the config's paths and globs into a checked list of files, up front, so a
typo fails in a second rather than after tokenizer training. `DocumentStream` reads those files in
order and yields one `str` per document, never holding a whole file in memory.

The reader is chosen by extension, after stripping a compression suffix (`.gz`, `.zst`):

- `.jsonl` / `.json`: HF `datasets`' JSON builder in streaming mode, one record per line (a `.json`
  file holding one JSON array also works, but the builder reads that file whole). The document is
  the record's `text_field`.
- `.parquet`: HF `datasets`' Parquet builder in streaming mode, reading only the `text_field`
  column.
- anything else: plain UTF-8 text, **documents separated by blank lines** (lines holding only
  whitespace count as blank; runs of them are one separator). This is the usual convention of
  pretraining text dumps (BERT's input format, for one); a file without blank lines is one
  document, and its text is held in memory while it is read. Line breaks inside a document are
  kept (`\\r\\n` becomes `\\n`); the newline that ends its last line is dropped.

A later reader (WET, Hub streaming, a line-level JSON reader) plugs in as one more entry of
`_READERS` behind `read_records`.

Known limitation: HF's JSON builder fails a whole 10 MB chunk on one malformed line, so a broken
line cannot be skipped: it stops the stream with a `DataError` naming the file, whatever
`data.strict` says. Records whose text field is missing (`null` or absent) or not a string are
skipped and counted in `stats` (or, with `strict=True`, raise a `DataError`). Empty documents are
skipped and counted as `empty` in both modes (they would add nothing but an EOS).
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import io
import itertools
import os
from typing import Any, Callable, Dict, Iterator, List, Sequence

from pkmlm.errors import DataError

# Compression suffixes that wrap any of the formats below.
_COMPRESSIONS = (".gz", ".zst")


# ----------------------------------------------------------------------------------------------
# Which files
# ----------------------------------------------------------------------------------------------


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _check_readable(path: str, pattern: str) -> None:
    where = path if path == pattern else f"{path} (from data.files pattern {pattern!r})"
    if os.path.isdir(path):
        raise DataError(
            f"data file {where} is a directory; give files or a glob such as '{pattern.rstrip('/')}/*.jsonl'"
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"data file {where} cannot be read ({e.strerror or e}); check its permissions") from None
    if path.endswith(".zst") and importlib.util.find_spec("zstandard") is None:
        raise DataError(f"data file {where} is zstd-compressed: reading it needs `pip install zstandard`")


def expand_files(patterns: Sequence[str]) -> List[str]:
    """Expand `data.files` into absolute file paths: `~`, globs (`**` recursive), relative paths.

    Each pattern's matches are sorted; patterns keep their order; a file named twice is kept at its
    first place. Directories matched by a glob are left out; a pattern that matches no file, a
    directory named as a file, or an unreadable file raises a `DataError` naming it.
    """
    if isinstance(patterns, str):  # a single path given where a list was expected
        patterns = [patterns]
    if not patterns:
        raise DataError("data.files is empty: give at least one path or glob, e.g. data.files=[corpus/*.jsonl.gz]")
    files: List[str] = []
    seen = set()
    for pattern in patterns:
        pattern = str(pattern)
        expanded = os.path.abspath(os.path.expanduser(pattern))
        if _has_glob(pattern) and not os.path.exists(expanded):  # a literal name like "a[1].txt" wins
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if not os.path.isdir(p))
            if not matches:
                raise DataError(
                    f"data.files pattern {pattern!r} matches no file (looked for {expanded}); "
                    "check the path, or set paths.sample_dir / PKMLM_SAMPLE_DIR for the sample data"
                )
        else:
            if not os.path.exists(expanded):
                raise DataError(
                    f"data file {pattern!r} does not exist (looked for {expanded}); check the path in data.files"
                )
            matches = [expanded]
        for path in matches:
            _check_readable(path, pattern)
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


# ----------------------------------------------------------------------------------------------
# Readers: one per file type, each yielding every record's text value (None when it has none)
# ----------------------------------------------------------------------------------------------


def file_kind(path: str) -> str:
    """The reader for `path`: "json", "parquet" or "text" (by extension, compression stripped)."""
    name = path.lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith((".jsonl", ".json")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
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


def _read_json(path: str, text_field: str, strict: bool) -> Iterator[Any]:
    datasets = _datasets()
    try:  # datasets globs data_files: escape so that a name like "a[1].jsonl" means itself
        ds = datasets.load_dataset("json", data_files=glob.escape(path), split="train", streaming=True)
    except StopIteration:  # the builder infers the schema from a first chunk; an empty file has none
        return
    features = ds.features
    if features is not None:
        if text_field not in features:
            raise DataError(
                f"data file {path} has no field {text_field!r} (data.text_field); its fields are "
                f"{sorted(features)}: set data.text_field to one of them"
            )
        ds = ds.select_columns([text_field])  # convert only the text column to Python
    for i, record in enumerate(ds):
        if i == 0 and features is None and text_field not in record:
            raise DataError(
                f"data file {path} has no field {text_field!r} (data.text_field); its fields are "
                f"{sorted(record)}: set data.text_field to one of them"
            )
        yield record.get(text_field)


def _read_parquet(path: str, text_field: str, strict: bool) -> Iterator[Any]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if text_field not in names:
        raise DataError(
            f"data file {path} has no column {text_field!r} (data.text_field); its columns are "
            f"{names}: set data.text_field to one of them"
        )
    # datasets globs data_files: escape so that a name like "a[1].parquet" means itself
    ds = _datasets().load_dataset(
        "parquet", data_files=glob.escape(path), split="train", streaming=True, columns=[text_field]
    )
    for record in ds:
        yield record[text_field]


def _open_text(path: str, strict: bool) -> io.TextIOBase:
    errors = "strict" if strict else "replace"  # invalid UTF-8 becomes U+FFFD unless strict
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    if path.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def _read_text(path: str, text_field: str, strict: bool) -> Iterator[Any]:
    with _open_text(path, strict) as f:
        lines: List[str] = []
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).removesuffix("\n")
                lines = []
        if lines:
            yield "".join(lines).removesuffix("\n")


Reader = Callable[[str, str, bool], Iterator[Any]]
_READERS: Dict[str, Reader] = {"json": _read_json, "parquet": _read_parquet, "text": _read_text}


def read_records(path: str, text_field: str = "text", strict: bool = False) -> Iterator[Any]:
    """Every record of `path` in file order, as its raw text value (a str, or None / another type
    for a record without usable text). Unreadable or malformed files raise a `DataError`."""
    kind = file_kind(path)
    try:
        yield from _READERS[kind](path, text_field, strict)
    except DataError:
        raise
    except (OSError, EOFError, ValueError) as e:  # bad gzip, truncated file, bad UTF-8 or JSON, Arrow errors
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, UnicodeDecodeError) and kind == "text":
            hint = "it is not UTF-8: convert it, or set data.strict=false to replace the bad bytes"
        elif kind == "json":
            hint = "fix or remove the file (one malformed JSON line fails the file, even with data.strict=false)"
        else:
            hint = "fix or remove the file"
        message = f"data file {path} cannot be read as {kind} ({type(e).__name__}: {detail[:200]}); {hint}"
        raise DataError(message) from None


# ----------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------


class DocumentStream:
    """Document texts over `files`, in order, one pass; resumable.

    The position is (file index, record index within that file), counting skipped records too.
    Iterating continues from the current position; `state_dict()` taken between two documents
    and loaded into a fresh stream makes it yield exactly the next document. Resuming inside a
    file re-reads that file up to the position and drops the records before it (about a second
    per 100 MB of JSON lines, only the text column being converted to Python).
    """

    def __init__(self, files: Sequence[str], text_field: str = "text", strict: bool = False):
        self.files = list(files)
        self.text_field = text_field
        self.strict = strict
        self.file_index = 0
        self.record_index = 0  # records of files[file_index] already consumed
        self.documents = 0  # documents yielded so far (across resumes)
        self.stats: Dict[str, int] = {"missing_field": 0, "non_string": 0, "empty": 0}

    def __iter__(self) -> Iterator[str]:
        while self.file_index < len(self.files):
            path = self.files[self.file_index]
            records = read_records(path, self.text_field, self.strict)
            for value in itertools.islice(records, self.record_index, None):
                index = self.record_index
                self.record_index += 1
                if isinstance(value, str):
                    if value:
                        self.documents += 1
                        yield value
                    else:
                        self.stats["empty"] += 1
                    continue
                kind = "missing_field" if value is None else "non_string"
                if self.strict:
                    what = "no" if value is None else f"a {type(value).__name__} (not a string) in its"
                    raise DataError(
                        f"data file {path}: record {index} (0-based) has {what} field {self.text_field!r} "
                        "(data.text_field); fix the file or set data.strict=false to skip such records"
                    )
                self.stats[kind] += 1
            self.file_index += 1
            self.record_index = 0

    def state_dict(self) -> Dict[str, Any]:
        return {
            "file_index": self.file_index,
            "record_index": self.record_index,
            "documents": self.documents,
            "stats": dict(self.stats),
            "n_files": len(self.files),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("n_files", len(self.files)) != len(self.files):
            raise DataError(
                f"cannot resume the data stream: the checkpoint read {state['n_files']} files, data.files "
                f"now gives {len(self.files)}; resume with the same data.files"
            )
        self.file_index = int(state["file_index"])
        self.record_index = int(state["record_index"])
        self.documents = int(state.get("documents", 0))
        self.stats = {**self.stats, **{k: int(v) for k, v in state.get("stats", {}).items()}}

