"""Cleaning hooks between reading and tokenizing: Unicode NFC, minimum length, exact duplicates.

Each is optional (`data.nfc`, `data.min_chars`, `data.dedup_window`) and counted in `stats`:
`nfc_normalized` (documents the normalisation changed), `too_short` and `duplicate` (documents
dropped). Order: NFC first (so that two spellings of the same text compare equal), then length,
then duplicates. Documents kept that are longer than `data.max_doc_chars` are counted as
`split_docs`: the tokenizer takes them in pieces (`tokenizer.encode_documents`).

Duplicates are exact: a document is dropped when a 64-bit BLAKE2b hash of its UTF-8 text equals
that of one of the last `dedup_window` documents kept by this reader (a FIFO window; a collision
between different texts has probability about window / 2^64). Each reader (rank x worker) has
its own window over its own share of the records, so duplicates that land on different readers
are both kept; the window restarts at every epoch (an epoch is meant to repeat the data).
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import deque
from typing import Any, Deque, Dict, Optional, Set


def text_hash(text: str) -> int:
    """A stable 64-bit hash of `text` (Python's `hash` is salted per process, so no use across restarts)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class Cleaner:
    def __init__(
        self, min_chars: int = 0, nfc: bool = False, dedup_window: int = 0, max_doc_chars: Optional[int] = None
    ):
        self.min_chars = min_chars
        self.nfc = nfc
        self.dedup_window = dedup_window
        self.max_doc_chars = max_doc_chars
        self.stats: Dict[str, int] = {}
        self._recent: Deque[int] = deque()
        self._recent_set: Set[int] = set()

    @property
    def active(self) -> bool:
        return self.min_chars > 0 or self.nfc or self.dedup_window > 0

    def _count(self, kind: str) -> None:
        self.stats[kind] = self.stats.get(kind, 0) + 1

    def __call__(self, text: str) -> Optional[str]:
        """The cleaned text, or None when the document is dropped."""
        if self.nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            self._count("nfc_normalized")
        if len(text) < self.min_chars:
            self._count("too_short")
            return None
        if self.dedup_window > 0:
            h = text_hash(text)
            if h in self._recent_set:
                self._count("duplicate")
                return None
            self._recent.append(h)
            self._recent_set.add(h)
            if len(self._recent) > self.dedup_window:
                self._recent_set.discard(self._recent.popleft())
        if self.max_doc_chars is not None and len(text) > self.max_doc_chars:
            self._count("split_docs")
        return text

    def reset_window(self, recent: Optional[list] = None) -> None:
        """Start a new dedup window, holding `recent` hashes (oldest first)."""
        self._recent = deque(int(h) for h in (recent or [])[-self.dedup_window :] if self.dedup_window > 0)
        self._recent_set = set(self._recent)

    def window(self) -> list:
        return list(self._recent)

    def state_dict(self) -> Dict[str, Any]:
        return {"recent": list(self._recent), "stats": dict(self.stats)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.reset_window(state.get("recent", []))
        self.stats = {k: int(v) for k, v in state.get("stats", {}).items()}
