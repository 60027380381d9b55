"""Packing documents' token ids into fixed windows, and a seeded shuffle buffer of windows.

The token stream is `EOS d1 EOS d2 EOS d3 EOS ...`: an EOS after every document, and one before
the first so that the first document's first token is a prediction target like every other.
Windows hold `seq_len + 1` tokens (inputs `w[:-1]`, targets `w[1:]`) and start every `seq_len`
tokens, so consecutive windows share one token and every token after the leading EOS is a target
exactly once. Documents are not cut to window boundaries: a window may span several documents
(attention crosses the EOS, as in GPT-2 training).
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Sequence, Union

Window = List[int]


class Packer:
    """Turns documents (lists of token ids) into windows of `seq_len + 1` tokens, stride `seq_len`.

    The state is the leftover buffer: the tokens after the last window emitted (starting with that
    window's last token, the next window's first).
    """

    def __init__(self, seq_len: int, eos_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._buffer: List[int] = [eos_id]

    def push(self, ids: Sequence[int]) -> List[Window]:
        """Add one document (then its EOS); return the windows completed by it, in order."""
        buffer = self._buffer
        buffer.extend(ids)
        buffer.append(self.eos_id)
        width, stride = self.seq_len + 1, self.seq_len
        if len(buffer) < width:
            return []
        starts = range(0, len(buffer) - width + 1, stride)
        windows = [buffer[s : s + width] for s in starts]
        del buffer[: starts[-1] + stride]  # keep the last window's final token onwards
        return windows

    def flush(self) -> Optional[Window]:
        """The final partial window (2 to seq_len tokens), or None when under 2 tokens are left
        (one token is no input/target pair). Used at the end of a finite pass (validation)."""
        rest, self._buffer = self._buffer, []
        return rest if len(rest) >= 2 else None

    def state_dict(self) -> Dict[str, Any]:
        return {"buffer": list(self._buffer)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._buffer = [int(t) for t in state["buffer"]]


class ShuffleBuffer:
    """Seeded shuffle buffer of windows: holds `size` items; each new item replaces a uniformly chosen
    held one, which comes out. `size=0` passes items through unchanged. Items never leave except
    by replacement: an endless stream needs no draining.

    The RNG is Python's `random.Random` (Mersenne Twister); its state (625 ints) goes into the
    state dict as a list, so the state is plain JSON.
    """

    def __init__(self, size: int, seed: Union[int, str]):
        if size < 0:
            raise ValueError(f"shuffle buffer size must be >= 0, got {size}")
        self.size = size
        self._items: List[Window] = []
        self._rng = random.Random(seed)  # str seeds hash with SHA-512: same stream on every machine

    def push(self, item: Window) -> Optional[Window]:
        """Add `item`; return the item that leaves (None while the buffer is filling)."""
        if self.size == 0:
            return item
        if len(self._items) < self.size:
            self._items.append(item)
            return None
        slot = self._rng.randrange(self.size)
        out, self._items[slot] = self._items[slot], item
        return out

    def __len__(self) -> int:
        return len(self._items)

    def state_dict(self) -> Dict[str, Any]:
        version, internal, gauss_next = self._rng.getstate()
        return {"items": [list(x) for x in self._items], "rng": [version, list(internal), gauss_next]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._items = [list(x) for x in state["items"]]
        version, internal, gauss_next = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss_next))
