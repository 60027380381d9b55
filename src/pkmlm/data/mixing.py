"""Sources resolved from the config, one source's training documents for one reader, and the
seeded weighted mixture of sources.

A *reader* is one (rank, DataLoader worker) pair: reader `slot = rank * workers + worker` of
`n_slots = world_size * workers`. Per source, the split is deterministic:

- validation: the first `data.val_docs` documents of the source (after cleaning), read by every
  reader and skipped by all;
- training: every record after them; reader `slot` keeps the records whose index (counted from
  the first training record, over the source's files in order, bad records included) is `slot`
  mod `n_slots`. So every training record is read by exactly one reader per epoch, and bad
  records are counted once, by the reader they fall to, over the first epoch (validation-phase
  counts only by slot 0).

Each source runs its own epochs (a source that ends starts again at its first training record,
its dedup window reset); `MixedDocuments` draws the source of each next document with a seeded
`random.Random` by weight, so a mixture's proportions hold in expectation over documents (not
tokens) and small sources repeat more often than large ones.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from pkmlm.data.cleaning import Cleaner
from pkmlm.data.config import MAX_RECORD_BYTES, DataConfig, SourceConfig
from pkmlm.data.sources import DocumentStream, HubSpec, expand_files
from pkmlm.errors import ConfigError, DataError


@dataclass
class Source:
    """A source with its files expanded (or its Hub dataset named)."""

    name: str
    files: List[str] = field(default_factory=list)
    hub: Optional[HubSpec] = None
    text_field: str = "text"
    weight: float = 1.0
    max_record_bytes: int = MAX_RECORD_BYTES  # data.max_record_bytes

    def stream(self, strict: bool) -> DocumentStream:
        return DocumentStream(
            self.files, text_field=self.text_field, strict=strict, hub=self.hub, max_record_bytes=self.max_record_bytes
        )


@dataclass
class DataPlan:
    """What the data config resolves to, checked before any expensive work: the sources, or the
    directory of pre-tokenized shards (`data.prepared`). Built once, by `loader.resolve_data`, and
    handed to everything that reads the data."""

    sources: List[Source]
    prepared: Optional[str] = None


def _source_config(value: Union[SourceConfig, Dict[str, Any]], key: str) -> SourceConfig:
    if isinstance(value, SourceConfig):
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        known = {f for f in SourceConfig.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(key, dict(value), f"a source with keys among {sorted(known)} (unknown: {unknown})")
        return SourceConfig(**dict(value))
    raise ConfigError(key, value, "a source: {files: [...], weight: ...} or {hub: NAME, hub_config: ..., split: ...}")


def resolve_sources(cfg: DataConfig) -> List[Source]:
    """`data.sources` (or the single source `data.files`) with files expanded and values checked."""
    if not cfg.sources:
        return [
            Source(
                name="data.files",
                files=expand_files(cfg.files),
                text_field=cfg.text_field,
                max_record_bytes=cfg.max_record_bytes,
            )
        ]
    if cfg.files:
        raise ConfigError(
            "data.files",
            list(cfg.files),
            "[] when data.sources is set (give the files as a source: data.sources=[{files: [...]}])",
        )
    sources = []
    for i, raw in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        s = _source_config(raw, key)
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise ConfigError(f"{key}.weight", s.weight, "a positive finite number (the source's sampling weight)")
        text_field = s.text_field or cfg.text_field
        if s.hub:
            if s.files:
                raise ConfigError(
                    f"{key}.files", list(s.files), "[] when hub is set: a source is files or a Hub dataset"
                )
            spec = HubSpec(name=s.hub, config=s.hub_config, split=s.split)
            sources.append(
                Source(
                    name=s.name or str(spec),
                    hub=spec,
                    text_field=text_field,
                    weight=s.weight,
                    max_record_bytes=cfg.max_record_bytes,
                )
            )
        else:
            if not s.files:
                raise ConfigError(key, {"files": [], "hub": None}, "files (paths or globs) or hub (a Hub dataset name)")
            files = expand_files(list(s.files), key=f"{key}.files")
            sources.append(
                Source(
                    name=s.name or s.files[0],
                    files=files,
                    text_field=text_field,
                    weight=s.weight,
                    max_record_bytes=cfg.max_record_bytes,
                )
            )
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError("data.sources", names, "sources with distinct names (set each source's name)")
    return sources


def make_cleaner(cfg: DataConfig) -> Cleaner:
    return Cleaner(min_chars=cfg.min_chars, nfc=cfg.nfc, dedup_window=cfg.dedup_window, max_doc_chars=cfg.max_doc_chars)


def merge_counts(*counts: Dict[str, int]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def validation_documents(source: Source, cfg: DataConfig) -> Iterator[str]:
    """The source's validation split: its first `cfg.val_docs` documents after cleaning."""
    cleaner = make_cleaner(cfg)
    taken = 0
    if cfg.val_docs <= 0:
        return
    for doc in source.stream(cfg.strict).documents_iter():
        text = cleaner(doc.text)
        if text is None:
            continue
        yield text
        taken += 1
        if taken >= cfg.val_docs:
            return


class SourceStream:
    """One source's training documents for reader `slot` of `n_slots`, epoch after epoch; resumable."""

    def __init__(self, source: Source, cfg: DataConfig, slot: int = 0, n_slots: int = 1):
        self.source = source
        self.cfg = cfg
        self.slot = slot
        self.n_slots = n_slots
        self.epoch = 0
        self.documents = 0  # training documents this reader has taken, all epochs
        self._epoch_docs = 0
        self._val_seen = 0  # validation documents passed in epoch 0 (for the empty-split message)
        self._train_start: Optional[Dict[str, Any]] = None  # stream state at the first training record
        self._val_hashes: List[int] = []  # dedup window after the validation documents
        self._done_stats: Dict[str, int] = {}  # the counts of epoch 0, once it is over
        self.cleaner = make_cleaner(cfg)
        self._stream = source.stream(cfg.strict)
        self._docs: Optional[Iterator] = None

    @property
    def stats(self) -> Dict[str, int]:
        """Skipped-record and cleaning counts of the first pass over this reader's records (later
        epochs read the same records again: counting them again would only multiply the numbers)."""
        if self.epoch == 0:
            return merge_counts(self._stream.stats, self.cleaner.stats)
        return dict(self._done_stats)

    def _find_training_start(self) -> None:
        """Pass over the validation documents (epoch 0 only) and start striding after them."""
        while self._val_seen < self.cfg.val_docs:
            doc = next(self._docs, None)
            if doc is None:
                break
            if self.cleaner(doc.text) is not None:
                self._val_seen += 1
        if self.slot != 0:  # validation-phase counts belong to reader 0 alone
            self._stream.stats.clear()
            self.cleaner.stats.clear()
        self._val_hashes = self.cleaner.window()
        self._stream.stride(self.slot, self.n_slots)
        state = self._stream.state_dict()
        self._train_start = {**state, "stats": {}, "documents": 0}

    def next_document(self) -> str:
        while True:
            if self._docs is None:
                self._docs = self._stream.documents_iter()
            if self._train_start is None:
                self._find_training_start()
            doc = next(self._docs, None)
            if doc is None:
                self._start_next_epoch()
                continue
            text = self.cleaner(doc.text)
            if text is None:
                continue
            self._epoch_docs += 1
            self.documents += 1
            return text

    def _start_next_epoch(self) -> None:
        if self._epoch_docs == 0:
            name = self.source.name
            files = f"{len(self.source.files)} files" if self.source.hub is None else "a Hub dataset"
            start = self._train_start["records"] if self._train_start is not None else 0
            if self._stream.records <= start:  # no record at all after the validation documents
                who = f"all {self._val_seen} documents are held out for validation by data.val_docs={self.cfg.val_docs}"
            else:
                who = (
                    f"reader {self.slot} of {self.n_slots} (rank x data.num_workers) gets none of its training records"
                )
            raise DataError(
                f"the training split of {name} ({files}) is empty: {who}; lower data.val_docs or add "
                "files to data.files"
            )
        if self.epoch == 0:
            self._done_stats = merge_counts(self._stream.stats, self.cleaner.stats)
        self.epoch += 1
        self._epoch_docs = 0
        self._stream = self.source.stream(self.cfg.strict)
        self._stream.load_state_dict(self._train_start)
        self.cleaner.reset_window(self._val_hashes)
        self._docs = None

    def state_dict(self) -> Dict[str, Any]:
        return {
            "name": self.source.name,
            "epoch": self.epoch,
            "documents": self.documents,
            "epoch_docs": self._epoch_docs,
            "val_seen": self._val_seen,
            "train_start": self._train_start,
            "val_hashes": list(self._val_hashes),
            "done_stats": dict(self._done_stats),
            "stream": self._stream.state_dict(),
            "cleaner": self.cleaner.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("name", self.source.name) != self.source.name:
            raise DataError(
                f"cannot resume the data pipeline: the checkpoint's source is {state['name']!r}, the "
                f"config's is {self.source.name!r}; resume with the same data.sources"
            )
        self.epoch = int(state["epoch"])
        self.documents = int(state["documents"])
        self._epoch_docs = int(state["epoch_docs"])
        self._val_seen = int(state.get("val_seen", 0))
        self._train_start = state["train_start"]
        self._val_hashes = [int(h) for h in state.get("val_hashes", [])]
        self._done_stats = {k: int(v) for k, v in state.get("done_stats", {}).items()}
        self._stream = self.source.stream(self.cfg.strict)
        self._stream.load_state_dict(state["stream"])
        self.cleaner.load_state_dict(state["cleaner"])
        self._docs = None


class MixedDocuments:
    """Training documents for one reader, each drawn from a source chosen by weight (seeded)."""

    def __init__(
        self, sources: Sequence[Source], cfg: DataConfig, seed: Union[int, str], slot: int = 0, n_slots: int = 1
    ):
        self.streams = [SourceStream(s, cfg, slot, n_slots) for s in sources]
        total = sum(s.weight for s in sources)
        self._cumulative = list(itertools.accumulate(s.weight / total for s in sources))
        self._rng = random.Random(f"pkmlm-mix/seed={seed}/slot={slot}")

    def next_document(self) -> str:
        if len(self.streams) == 1:
            return self.streams[0].next_document()
        i = min(bisect.bisect_right(self._cumulative, self._rng.random()), len(self.streams) - 1)
        return self.streams[i].next_document()

    @property
    def epoch(self) -> int:
        """Completed passes of the source that has made the fewest."""
        return min(s.epoch for s in self.streams)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.streams)

    @property
    def stats(self) -> Dict[str, int]:
        return merge_counts(*(s.stats for s in self.streams))

    def per_source(self) -> Dict[str, Dict[str, int]]:
        return {s.source.name: {"epoch": s.epoch, "documents": s.documents} for s in self.streams}

    def state_dict(self) -> Dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"sources": [s.state_dict() for s in self.streams], "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.streams):
            raise DataError(
                f"cannot resume the data pipeline: the checkpoint mixed {len(state['sources'])} sources, "
                f"the config gives {len(self.streams)}; resume with the same data.sources"
            )
        for stream, s in zip(self.streams, state["sources"]):
            stream.load_state_dict(s)
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))


def interleave(iterators: Sequence[Iterator[Any]], weights: Sequence[float], seed: str) -> Iterator[Any]:
    """The items of `iterators`, each next one from an iterator drawn by weight (seeded); an
    iterator that ends drops out, and the rest go on until every one has ended."""
    rng = random.Random(seed)
    live = list(zip(weights, iterators))
    while live:
        i = rng.choices(range(len(live)), weights=[w for w, _ in live])[0] if len(live) > 1 else 0
        item = next(live[i][1], _END)
        if item is _END:
            del live[i]
            continue
        yield item


_END = object()


def sample_documents(sources: Sequence[Source], cfg: DataConfig, n: int) -> Iterator[str]:
    """The tokenizer's training sample: `n` cleaned documents from the start of the sources,
    interleaved by weight (seeded, independent of the run's seed); a source that ends drops out."""

    def cleaned(source: Source) -> Iterator[Optional[str]]:
        # None for a document cleaning drops: it still takes its draw, as a document does.
        cleaner = make_cleaner(cfg)
        return (cleaner(doc.text) for doc in source.stream(cfg.strict).documents_iter())

    texts = interleave([cleaned(s) for s in sources], [s.weight for s in sources], seed="pkmlm-tokenizer-sample")
    return itertools.islice((t for t in texts if t is not None), n)
