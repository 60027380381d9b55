"""Gradient-norm clipping: one function for every kind of gradient the loop produces.

`clip_grad_norm_` is `torch.nn.utils.clip_grad_norm_` (the 2-norm over all gradients, scaled down
to `max_norm` when above it) extended to
- sparse COO gradients (`optim.sparse_values`): coalesced in place, counted by their values;
- DTensor gradients (FSDP2 shards, sharded value tables): each shard's squared norm is summed over
  the ranks of its mesh; replicated gradients count once.
With only dense local gradients it is torch's own function (bitwise the same as before).

`clip_gradients_` is what the training step calls: one global clip (`optim.grad_clip`), or, with
`optim.values_grad_clip > 0`, the memory value tables clipped by their own norm apart from the
rest (Memory Layers at Scale, Berges et al. 2024, clip the values separately).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from pkmlm.optim.config import OptimConfig


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip the gradients of `parameters` to a total 2-norm of `max_norm` (inf: measure only);
    returns the total norm before clipping (fp32 scalar on the gradients' device)."""
    params = [p for p in parameters if p.grad is not None]
    sparse = any(p.grad.is_sparse for p in params)
    sharded = [p.grad for p in params if _is_dtensor(p.grad)]
    if not sparse and not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in params:
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()  # duplicate rows summed (the optimizer would coalesce anyway)
    if not sharded:  # dense and sparse local gradients: the norm of the per-tensor norms, as torch
        norms = [
            torch.linalg.vector_norm(p.grad.values() if p.grad.is_sparse else p.grad, dtype=torch.float32)
            for p in params
        ]
        total = torch.linalg.vector_norm(torch.stack(norms))
    else:
        total_sq = _sharded_square_sum(
            sharded, torch.zeros((), dtype=torch.float32, device=sharded[0].to_local().device)
        )
        for g in (p.grad for p in params if not _is_dtensor(p.grad)):
            total_sq += (g.values() if g.is_sparse else g).float().pow(2).sum()
        total = total_sq.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_coef_clamped
        for p in params:
            g = p.grad.to_local() if _is_dtensor(p.grad) else (p.grad.values() if p.grad.is_sparse else p.grad)
            g.mul_(coef.to(g.dtype))
    return total


def _sharded_square_sum(grads: Sequence[Tensor], like: Tensor) -> Tensor:
    """Sum of squares of DTensor gradients over their meshes (a collective for sharded ones)."""
    import torch.distributed as dist

    total = torch.zeros_like(like)
    by_group: dict = {}
    for g in grads:
        sq = g.to_local().float().pow(2).sum()
        if any(pl.is_shard() for pl in g.placements):  # each rank holds a part: sum over the mesh
            group = g.device_mesh.get_group()
            acc = by_group.get(id(group), (group, torch.zeros_like(like)))[1]
            by_group[id(group)] = (group, acc + sq)
        else:  # replicated: every rank holds all of it
            total += sq
    for group, acc in by_group.values():
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=group)
        total += acc
    return total


def clip_gradients_(
    params: Sequence[nn.Parameter], value_params: Sequence[nn.Parameter], cfg: OptimConfig
) -> tuple[Tensor, Tensor | None]:
    """The step's clipping: `(norm, values_norm)`, both before clipping. `values_norm` is None when
    the values are clipped with everything else (`optim.values_grad_clip=0`); otherwise `norm` is
    the norm of the other parameters."""
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # 0: no clipping
    if cfg.values_grad_clip <= 0:
        return clip_grad_norm_(params, max_norm), None
    value_ids = {id(p) for p in value_params}
    rest = [p for p in params if id(p) not in value_ids]
    return clip_grad_norm_(rest, max_norm), clip_grad_norm_(value_params, cfg.values_grad_clip)
