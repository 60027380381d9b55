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

import numpy as np

Window = List[int]
TOKEN_DTYPE = np.int32  # token ids inside the pipeline; batches leave as int64 tensors


def to_plain(value: Any) -> Any:
    """A state with numpy arrays and tuples as plain JSON values (lists, ints, dicts)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(type(x) is int for x in value):
            return list(value)
        return [to_plain(x) for x in value]
    return value


class Packer:
    """Turns documents (lists of token ids) into windows of `seq_len + 1` tokens, stride `seq_len`.

    The state is the leftover buffer: the tokens after the last window emitted (starting with that
    window's last token, the next window's first).
    """

    def __init__(self, seq_len: int, eos_id: int):
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

    def push_many(self, docs: Sequence[Sequence[int]]) -> np.ndarray:
        """`push` for several documents at once: the windows completed, as an int32 array
        `(n_windows, seq_len + 1)` (the same windows `push` would give, one by one)."""
        buffer = self._buffer
        eos = self.eos_id
        for ids in docs:
            buffer.extend(ids)
            buffer.append(eos)
        width, stride = self.seq_len + 1, self.seq_len
        n = (len(buffer) - 1) // stride if len(buffer) >= width else 0
        if n == 0:
            return np.empty((0, width), dtype=TOKEN_DTYPE)
        flat = np.array(buffer[: (n - 1) * stride + width], dtype=TOKEN_DTYPE)
        # Window k is flat[k*stride : k*stride + width]: a strided view, copied into its own rows.
        windows = np.lib.stride_tricks.as_strided(
            flat, shape=(n, width), strides=(stride * flat.itemsize, flat.itemsize), writeable=False
        ).copy()
        del buffer[: n * stride]  # keep the last window's final token onwards
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

    def raw_state(self) -> Dict[str, Any]:
        """The state as cheap copies (numpy rows stacked into one array): for per-batch snapshots."""
        items = self._items
        if items and isinstance(items[0], np.ndarray):
            stacked: Any = np.stack(items)
        else:
            stacked = [list(x) for x in items]
        version, internal, gauss_next = self._rng.getstate()
        return {"items": stacked, "rng": [version, internal, gauss_next]}

    def state_dict(self) -> Dict[str, Any]:
        return to_plain(self.raw_state())

    def load_state_dict(self, state: Dict[str, Any], as_array: bool = False) -> None:
        """`as_array`: hold the items as int32 numpy rows (the training pipeline's form)."""
        items = state["items"]
        if as_array:
            self._items = list(np.asarray(items, dtype=TOKEN_DTYPE)) if len(items) else []
        else:
            self._items = [list(x) for x in items]
        version, internal, gauss_next = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss_next))
