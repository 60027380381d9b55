"""The key/value cache of incremental decoding: `KVCache`.

A decoder-only transformer's attention at position t reads the keys and values of positions <= t.
Decoding one token at a time, those of the earlier positions never change, so they are kept here
and each new token computes only its own (the cost of a token is then O(T) instead of O(T^2) for
re-running the window). Memory layers and FFNs act on each token alone and need nothing cached;
with a BatchNorm query norm that holds only in eval mode (running statistics), which is why
`Transformer.forward` refuses a cache in training mode.

Batches of prompts of different lengths sit left-padded in one buffer of slots: slot s of every row
holds the s-th input of that row's forward calls, `valid` says which slots hold real tokens. A
token's position (rotary angle or learned row) counts the real tokens before it in its row, so a
row's positions are those it would have alone; attention reads the valid slots up to its own. A
padding slot attends to itself only (its output is never read; a row with no allowed key would
give NaN, which a zero attention weight cannot cancel in the next layer's `weights @ values`).

Shape legend (suffixes on tensor names):
  B  rows (prompts)   T  tokens of this forward   C  capacity in slots   L  slots filled so far
  nh attention heads  hd head dim
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor


class LayerKV:
    """One attention layer's keys and values `(B, nh, C, hd)`, allocated at the first write (in the
    dtype and on the device of the keys, which the cache does not know in advance)."""

    def __init__(self, cache: "KVCache"):
        self.cache = cache
        self.k_BhCd: Optional[Tensor] = None
        self.v_BhCd: Optional[Tensor] = None
        # The decode state of each side layer of this block, by its name (`SideLayer.new_decode_state`)
        self.side: Dict[str, Any] = {}

    def update(self, k_BhTd: Tensor, v_BhTd: Tensor) -> Tuple[Tensor, Tensor]:
        """Write this forward's keys and values into their slots; all keys and values so far `(B, nh, L, hd)`."""
        cache = self.cache
        if self.k_BhCd is None:
            B, nh, _, hd = k_BhTd.shape
            self.k_BhCd = k_BhTd.new_empty(B, nh, cache.capacity, hd)
            self.v_BhCd = v_BhTd.new_empty(B, nh, cache.capacity, hd)
        start = cache.length - k_BhTd.shape[2]  # `KVCache.extend` has already reserved the slots
        self.k_BhCd[:, :, start : cache.length] = k_BhTd
        self.v_BhCd[:, :, start : cache.length] = v_BhTd
        return self.k_BhCd[:, :, : cache.length], self.v_BhCd[:, :, : cache.length]

    def keep(self, rows_R: Tensor) -> None:
        if self.k_BhCd is not None:
            self.k_BhCd, self.v_BhCd = self.k_BhCd[rows_R], self.v_BhCd[rows_R]
        for state in self.side.values():
            state.keep(rows_R)


class KVCache:
    """The keys and values of every attention layer for a batch of `batch` rows and `capacity`
    slots, filled by `Transformer.forward(idx, cache=cache, valid_BT=...)` calls in order."""

    def __init__(self, n_layers: int, batch: int, capacity: int, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.length = 0  # slots filled (L)
        self.layers: List[LayerKV] = [LayerKV(self) for _ in range(n_layers)]
        self.valid_BC = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.seen_B = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row so far
        self.mask_B1TL: Optional[Tensor] = None  # the attention mask of the forward in progress

    @property
    def batch(self) -> int:
        return self.valid_BC.shape[0]

    def extend(self, valid_BT: Tensor) -> Tensor:
        """Reserve T slots for the next forward (`valid_BT`: which of its inputs are real tokens);
        set its attention mask; return the positions `(B, T)` of its inputs (0 for padding)."""
        B, T = valid_BT.shape
        if B != self.batch or self.length + T > self.capacity:
            raise ValueError(
                f"KV cache of {self.batch} rows x {self.capacity} slots ({self.length} filled) cannot take "
                f"{B} rows x {T} more tokens; build a larger cache"
            )
        start, self.length = self.length, self.length + T
        self.valid_BC[:, start : self.length] = valid_BT
        # A real token's position: the real tokens before it in its row (so left padding shifts nothing).
        positions_BT = self.seen_B[:, None] + valid_BT.long().cumsum(1) - 1
        positions_BT = positions_BT.clamp(min=0).masked_fill(~valid_BT, 0)
        self.seen_B = self.seen_B + valid_BT.long().sum(1)
        slot_T = torch.arange(start, self.length, device=valid_BT.device)
        slot_L = torch.arange(self.length, device=valid_BT.device)
        causal_TL = slot_L[None, :] <= slot_T[:, None]  # each input reads the slots up to its own
        own_TL = slot_L[None, :] == slot_T[:, None]
        mask_BTL = (causal_TL[None] & self.valid_BC[:, None, : self.length]) | own_TL[None]
        self.mask_B1TL = mask_BTL[:, None]  # broadcast over heads
        return positions_BT

    def keep(self, rows_R: Tensor) -> None:
        """Keep only batch rows `rows_R` (int64 indices, in the new order): finished rows stop costing."""
        rows_R = rows_R.to(self.valid_BC.device)
        self.valid_BC, self.seen_B = self.valid_BC[rows_R], self.seen_B[rows_R]
        for layer in self.layers:
            layer.keep(rows_R)
