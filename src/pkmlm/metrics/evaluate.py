"""Validation pass: token-weighted loss, perplexity and memory usage over a whole evaluation set.

Everything accumulates on the model's device; the host waits for the device once, at the end.
Shape legend: B sequences, T positions (a batch holds T+1 tokens: inputs and shifted targets).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from torch import Tensor

from pkmlm.metrics.memory_usage import memory_metrics, track_memory_usage
from pkmlm.metrics.table_usage import side_metrics, track_side_usage

__all__ = ["evaluate", "bits_per_byte", "perplexity"]

# exp(709.78) is the largest finite float64; beyond it perplexity is reported as inf.
_MAX_EXP_ARG = 709.0


def perplexity(loss_nats: float) -> float:
    """exp(loss) without OverflowError: inf for a huge loss, NaN for NaN."""
    if math.isnan(loss_nats):
        return math.nan
    return math.exp(loss_nats) if loss_nats < _MAX_EXP_ARG else math.inf


def bits_per_byte(loss_sum_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte of text: total loss in nats / (ln 2 · bytes).

    ``loss_sum_nats`` is the SUM of the token losses over the text (``loss * tokens`` from
    :func:`evaluate`), ``n_bytes`` the UTF-8 length of the same text; the ratio compares models
    with different tokenizers.
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return float(loss_sum_nats) / (math.log(2) * n_bytes)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Tensor],
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    reduce_across_ranks: bool = False,
) -> dict[str, float]:
    """Mean token loss, perplexity and memory-usage metrics of ``model`` on ``batches``.

    Each batch is a (B, T+1) int64 tensor: inputs ``b[:, :-1]``, targets ``b[:, 1:]``; batches may
    differ in B and T. ``model(inputs, targets)`` must return ``(logits, loss)`` with ``loss`` the
    mean over the B·T targets, so the pass sums ``loss · B·T`` (float64, on device) and divides
    by the total token count: the result is the mean over tokens, not over batches.

    Memory-usage trackers are attached to every memory layer and side layer for the whole pass and
    always detached afterwards (also on an exception); the model's train/eval mode is restored.
    With ``autocast_dtype`` on a CUDA device, forwards run under ``torch.autocast``; on CPU the
    argument is ignored (fp32 evaluation).
    With ``reduce_across_ranks`` and an initialised process group, the loss sum, token count and
    memory statistics are summed over ranks first (each rank evaluates its own share of batches).

    Returns ``{"loss", "ppl", "tokens", **memory_metrics}`` (``memory/layer{i}/...`` keys, none
    for a dense model). With no batches at all: ``{"loss": nan, "ppl": nan, "tokens": 0}`` and no
    memory keys (there is nothing to measure).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    use_autocast = autocast_dtype is not None and device.type == "cuda"
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0  # from shapes only: no sync
    try:
        with track_memory_usage(model) as trackers, track_side_usage(model) as side:
            for batch_BT1 in batches:
                batch_BT1 = batch_BT1.to(device, non_blocking=True)
                inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
                with torch.autocast(device.type, dtype=autocast_dtype) if use_autocast else contextlib.nullcontext():
                    _, loss = model(inputs_BT, targets_BT)
                loss_sum += loss.detach().to(torch.float64) * targets_BT.numel()
                n_tokens += targets_BT.numel()
            if reduce_across_ranks:
                n_tokens = _all_reduce_sum(loss_sum, n_tokens, [*trackers.values(), *side.values()])
            if n_tokens == 0:
                return {"loss": math.nan, "ppl": math.nan, "tokens": 0}
            memory = {**memory_metrics(trackers), **side_metrics(side)}  # the host sync for the memory statistics
    finally:
        model.train(was_training)
    loss = loss_sum.item() / n_tokens
    return {"loss": loss, "ppl": perplexity(loss), "tokens": n_tokens, **memory}


def _all_reduce_sum(loss_sum: Tensor, n_tokens: int, trackers: list) -> int:
    """Sum loss, tokens and trackers over ranks in place; returns the global token count."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n_tokens
    dist.all_reduce(loss_sum)
    tokens = torch.tensor(n_tokens, dtype=torch.int64, device=loss_sum.device)
    dist.all_reduce(tokens)
    for tracker in trackers:
        tracker.all_reduce_()
    return int(tokens.item())
