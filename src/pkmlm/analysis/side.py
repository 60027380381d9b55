"""What a trained model's side layers read (`pkmlm.model.variants.SideLayer`, e.g. Engram's hashed
n-gram tables), for `pkmlm-inspect`: usage statistics over the evaluation batches
(`metrics.table_usage`) and the layer's own description of its reads on them
(`SideLayer.describe_reads`: for Engram, the collision rates per order and the most-read rows
with the n-grams, decoded by the run's tokenizer, that hash to them).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from pkmlm.metrics.table_usage import track_side_usage

# Token positions given to `describe_reads` at most: its collision count sorts the sample's n-grams.
MAX_SAMPLE_TOKENS = 1 << 20


@torch.no_grad()
def inspect_side_layers(
    model: nn.Module, batches: Sequence[Tensor], device: torch.device | str, tokenizer: Any, top: int
) -> dict[str, dict[str, Any]]:
    """{metric prefix (`memory/layer{i}/<side_name>`): {"stats": usage statistics, "lines": the
    layer's description of its reads}} over `batches` (`(B, T+1)` int64, inputs `b[:, :-1]`); the
    model's mode and observers are restored afterwards."""
    layers = model.side_layers() if hasattr(model, "side_layers") else {}
    if not layers:
        return {}
    was_training = model.training
    model.eval()
    try:
        with track_side_usage(model) as trackers:
            for batch_BT1 in batches:
                model(batch_BT1[:, :-1].to(device, non_blocking=True))
            stats = {prefix: tracker.compute() for prefix, tracker in trackers.items()}
    finally:
        model.train(was_training)
    sample, tokens = [], 0
    for batch_BT1 in batches:  # rows of equal length (a batch's), up to the sample's size
        if tokens >= MAX_SAMPLE_TOKENS:
            break
        sample.append(batch_BT1[:, :-1])
        tokens += batch_BT1[:, :-1].numel()
    width = min(b.shape[1] for b in sample)
    idx_BT = torch.cat([b[:, :width] for b in sample]).to(device)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    out = {}
    for (prefix, s), layer in zip(stats.items(), layers.values()):
        out[prefix] = {"stats": s, "lines": layer.describe_reads(idx_BT, decode, top=top)}
    return out
