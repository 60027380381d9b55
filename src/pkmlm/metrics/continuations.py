"""Log-likelihood of continuations given contexts, batched: the one scorer behind recall
(`pkmlm.metrics.recall`) and the lm-eval adapter (`pkmlm.harness`).

A request is two lists of token ids, `context` and `continuation` (non-empty). The model reads
`context + continuation` minus its last token and is scored on the continuation's tokens:
`logprob = sum_i log p(cont_i | context, cont_<i)`, and `greedy` says whether every continuation
token is the model's argmax at its position, i.e. whether greedy decoding from the context
reproduces exactly these tokens. A sequence longer than the model's window keeps its last
`max_len + 1` tokens (the context is cut on the left, as lm-eval's Hugging Face model does); a
continuation longer than `max_len` cannot be scored in one window and is refused.

Shape legend: B requests in a batch, T positions (the longest input of the batch), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Score", "logits_of", "score_continuations"]


@dataclass(frozen=True)
class Score:
    logprob: float  # natural log, summed over the continuation's tokens
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int  # continuation tokens scored


def logits_of(model: torch.nn.Module, ids_BT: Tensor) -> Tensor:
    """`(B, T, V)` logits of a causal LM: pkmlm's `Transformer` returns `(logits, loss)`, a plain
    module its logits."""
    out = model(ids_BT)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_len: int,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Score]:
    """A `Score` per `(context_ids, continuation_ids)` request, in the requests' order.

    Requests are batched longest first (so padding is small), right-padded with id 0 (causal
    attention: padding after a sequence cannot change its logits). The model is put in eval mode
    for the pass and its mode restored. `progress(n)` is called after each batch with its size.
    """
    if device is None:
        device = next(model.parameters()).device
    windows = []
    for i, (context, continuation) in enumerate(requests):
        if len(continuation) == 0:
            raise ValueError(f"request {i}: empty continuation (nothing to score)")
        if len(continuation) > max_len:
            raise ValueError(
                f"request {i}: a continuation of {len(continuation)} tokens does not fit the "
                f"model's window of {max_len}"
            )
        whole = (list(context) + list(continuation))[-(max_len + 1) :]
        if len(whole) < 2:
            raise ValueError(f"request {i}: empty context (give at least one token, e.g. end-of-text)")
        windows.append(whole)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    scores: list[Score | None] = [None] * len(windows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            T = max(len(windows[i]) for i in chunk) - 1
            ids_BT = torch.zeros((len(chunk), T), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids_BT[row, : len(windows[i]) - 1] = torch.tensor(windows[i][:-1])
            logprobs_BTV = torch.log_softmax(logits_of(model, ids_BT.to(device)).float(), dim=-1)
            for row, i in enumerate(chunk):
                n = len(requests[i][1])
                end = len(windows[i]) - 1  # positions end-n .. end-1 predict the continuation
                target = torch.tensor(windows[i][-n:], device=logprobs_BTV.device)
                lp_nV = logprobs_BTV[row, end - n : end]
                logprob = lp_nV.gather(1, target[:, None]).sum()
                greedy = bool((lp_nV.argmax(-1) == target).all())
                scores[i] = Score(float(logprob), greedy, n)
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return scores  # type: ignore[return-value]
