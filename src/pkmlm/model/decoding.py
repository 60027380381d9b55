"""Incremental decoding of a `Transformer`: `Decoder` (a batch of prompts on one KV cache) and
`sample_next` (greedy, temperature, top-k, top-p). `pkmlm.generate` and the harness's
`generate_until` drive them; each decides itself when a row is finished.

Prompts of different lengths are left-padded into one batch (model/kv_cache.py): each row's
positions and attention are those it would have alone, so a batch decodes as its rows would one by
one. The window: a row never holds more than `model.max_seq_len` tokens in the cache. When one
would, the decoder slides it as the cacheless loop does (each row's last `max_seq_len` tokens,
positions from 0 again) by re-running those windows: from then on every token costs a full window,
as without a cache (rotary angles and learned positions both depend on the absolute position, so
cached keys cannot be shifted). Callers that stay within the window (the harness) never slide.

Shape legend: B rows, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pkmlm.model.kv_cache import KVCache
from pkmlm.model.transformer import Transformer


class Decoder:
    """`start()` -> the next-token logits `(B, V)` after each prompt; `step(ids_B)` appends one token
    to every row and returns the logits after it; `keep(rows)` drops finished rows.

    `max_new_tokens` sizes the cache (`step` may be called that many times). The model must be in
    eval mode (`Transformer.forward` refuses a cache otherwise)."""

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. the end-of-text token)")
        self.model = model
        self.window = model.cfg.max_seq_len
        self.max_new_tokens = max_new_tokens
        self.rows = [list(p) for p in prompts]  # each row's tokens so far (the windows of a slide)
        self.device = model.tok_emb.weight.device
        self.cache: Optional[KVCache] = None

    def start(self) -> Tensor:
        return self._prefill()

    def _prefill(self) -> Tensor:
        """A fresh cache from each row's last `window` tokens, left-padded: their last logits `(B, V)` fp32."""
        windows = [row[-self.window :] for row in self.rows]
        width = max(len(w) for w in windows)
        ids_BT = torch.zeros((len(windows), width), dtype=torch.long)
        valid_BT = torch.zeros((len(windows), width), dtype=torch.bool)
        for b, w in enumerate(windows):
            ids_BT[b, width - len(w) :] = torch.tensor(w, dtype=torch.long)
            valid_BT[b, width - len(w) :] = True
        self.cache = self.model.new_cache(len(windows), width + self.max_new_tokens)
        logits_BTV = self.model(ids_BT.to(self.device), cache=self.cache, valid_BT=valid_BT.to(self.device))[0]
        return logits_BTV[:, -1].float()

    def step(self, ids_B: Tensor) -> Tensor:
        for row, token in zip(self.rows, ids_B.tolist()):
            row.append(token)
        if max(len(row) for row in self.rows) > self.window:
            return self._prefill()  # slide (module docstring)
        logits_BTV = self.model(ids_B.view(-1, 1).to(self.device), cache=self.cache)[0]
        return logits_BTV[:, -1].float()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep rows `rows` (indices into the current rows, in their new order)."""
        self.rows = [self.rows[r] for r in rows]
        if self.cache is not None:
            self.cache.keep(torch.tensor(list(rows), dtype=torch.long))


def sample_next(
    logits_BV: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """The next token of each row `(B,)`: the argmax for `temperature <= 0`, else a sample of
    softmax(logits / temperature) restricted to the `top_k` most likely tokens and to the smallest
    set of most likely tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al.
    2020), the most likely token always kept."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(-1, descending=True)
        probs_BV = F.softmax(sorted_BV, -1)
        # Drop a token when the tokens more likely than it already reach top_p.
        drop_sorted_BV = probs_BV.cumsum(-1) - probs_BV >= top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return torch.multinomial(F.softmax(logits_BV, -1), 1, generator=generator).squeeze(-1)
