"""Writing a prepared directory (`prepare`, run by `pkmlm-prepare`): resumable, byte-identical.

Training documents are one pass over each source after its validation documents, cleaned,
interleaved by weight (seeded) until every source is used up (or `max_tokens` training tokens
are written).

Everything goes to `DIR.partial/` first; a training shard closes at the first encode chunk
(`data.encode_batch_docs` documents) that brings it to `shard_tokens` tokens, and then
`DIR.partial/progress.json` records the closed shards and the reading position (each source's
stream state, the interleave RNG). Rerunning the same command after an interruption (Ctrl-C,
kill -9, a full disk) continues from the last closed shard: the output is byte-identical to an
uninterrupted run. When done, `DIR.partial` becomes `DIR` in one rename.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import os
import random
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from pkmlm.data.config import DataConfig
from pkmlm.data.mixing import Source, SourceStream, validation_documents
from pkmlm.data.prepared.index import FORMAT, INDEX, SHARD_NAME, token_dtype
from pkmlm.data.tokenizer import encode_documents, eos_id, load_tokenizer
from pkmlm.errors import DataError

PROGRESS = "progress.json"  # in DIR.partial while writing: closed shards and the reading position
MARKER = ".pkmlm-prepare"  # marks DIR.partial as ours (it may be removed and rewritten)


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
        if SHARD_NAME.fullmatch(name) and name not in kept:
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
    index = _index(cfg, sources, tokenizer, {"val": val, "train": writer.shards}, shard_tokens, max_tokens)
    return {**index, "skipped": passing.counts(), "stopped_by": stopped_by, "resumed_shards": resumed}


def _index(
    cfg: DataConfig,
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    splits: Dict[str, List[Dict[str, Any]]],
    shard_tokens: int,
    max_tokens: Optional[int],
) -> Dict[str, Any]:
    """The index of finished `splits` (`_write` adds the reading's counts: skipped, stopped_by)."""
    vocab = tokenizer.get_vocab_size()
    return {
        "format": FORMAT,
        "id": uuid.uuid4().hex,
        "dtype": token_dtype(vocab).name,
        "eos_id": eos_id(tokenizer),
        "vocab_size": vocab,
        "tokenizer": "tokenizer.json",
        "splits": splits,
        "tokens": {k: sum(s["tokens"] for s in v) for k, v in splits.items()},
        "documents": {k: sum(s["documents"] for s in v) for k, v in splits.items()},
        "skipped": {},
        "sources": [{"name": s.name, "weight": s.weight} for s in sources],
        "stopped_by": None,
        "max_tokens": max_tokens,
        "shard_tokens": shard_tokens,
        "resumed_shards": 0,
        "data_config": _config_dict(cfg),
    }
