"""The prepared directory's format: its names, the index's structure and the shards' checks,
shared by the writer (`writer.py`) and the reader (`reader.py`).

Reading checks before any batch: `load_index` checks the index's structure and the shards' sizes
(cheap, at start-up); `open_shards` reads each shard once and checks its SHA-256 and that every
id is below the vocabulary size (about 1 s per GB, shards in parallel), so a damaged shard or ids
of another tokenizer are one line, never an IndexError in the embedding at step 1.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tokenizers import Tokenizer

from pkmlm.data.tokenizer import load_tokenizer
from pkmlm.errors import DataError

FORMAT = "pkmlm-prepared/2"  # /2: shards carry their SHA-256
INDEX = "index.json"
SHARD_NAME = re.compile(r"(train|val)_\d{5}\.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERIFY_BLOCK = 1 << 24  # bytes per read when verifying a shard


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 2^16), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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
                and SHARD_NAME.fullmatch(shard["file"])
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
