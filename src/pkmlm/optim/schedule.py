"""Learning-rate schedules: one factor per step, applied to each group's own peak LR.

`lr_factor` is the model's schedule (linear warmup, then cosine, inverse square root or constant).
`set_lr` applies it; the memory values' group follows it, or with `optim.values_schedule=constant`
keeps its peak `optim.values_lr` at every step (XLM; Memory Layers at Scale).
"""

from __future__ import annotations

import math
from typing import Any

from pkmlm.optim.config import OptimConfig


def lr_factor(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based: the update about to happen)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "inv_sqrt":
        # Transformer-style decay, continuous at the end of warmup (Vaswani et al. 2017, eq. 3).
        return math.sqrt(max(cfg.warmup_steps, 1) / (step + 1))
    # cosine from 1 at the end of warmup to min_lr_ratio at max_steps
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: Any, step: int, max_steps: int, cfg: OptimConfig) -> None:
    """Each group's LR for optimizer step `step`: its `peak_lr` times the schedule's factor, except
    the values' group under `values_schedule=constant`, which keeps its peak."""
    factor = lr_factor(step, max_steps, cfg)
    for group in optimizer.param_groups:
        constant = group["name"] == "memory_values" and cfg.values_schedule == "constant"
        group["lr"] = group["peak_lr"] * (1.0 if constant else factor)
