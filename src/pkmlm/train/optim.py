"""AdamW with parameter groups, and the learning-rate schedules.

Three groups:
- `decay`: weight matrices of attention, FFN and the memory's query network (weight decay);
- `no_decay`: norms, biases, embeddings and the memory's product keys (no decay, as in GPT-2 /
  nanoGPT practice for 1-D parameters and embeddings);
- `memory_values`: every memory value table, with `optim.values_lr` (the paper's 1e-3) and no
  weight decay: a row is only touched when selected, and decay would shrink rarely-read rows.
The schedule multiplies each group's own peak LR by the same factor. With `optim.sparse_values=true`
the values take row-sparse gradients and a lazy Adam step instead (pkmlm/train/sparse_values.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pkmlm.train.sparse_values import SparseValuesAdamW, clip_grad_norm_  # noqa: F401  (clip: the loop's)


# `optim.*` of the root config (pkmlm.config re-exports it). It lives here, beside its one user, so
# that scripts/bench_model.py builds the training optimizer with torch alone (no omegaconf/Hydra).
@dataclass
class OptimConfig:
    lr: float = 3e-3
    # Memory values: their own LR and no weight decay. 1e-3 is the paper's (Lample et al. 2019,
    # section 4.2: values trained with a learning rate of 1e-3, sparse Adam).
    values_lr: float = 1e-3
    weight_decay: float = 0.1  # on matrices only; norms, biases, embeddings and keys get none
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # 0.95 rather than 0.999: steadier LM training (GPT-3, nanoGPT)
    eps: float = 1e-8  # AdamW denominator epsilon
    schedule: str = "cosine"  # cosine | inv_sqrt | constant (all after a linear warmup)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak LR
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Memory values get row-sparse gradients and a lazy Adam step that touches only the rows read
    # this step (moments of unread rows are not decayed; see pkmlm/train/sparse_values.py). False: AdamW.
    sparse_values: bool = False


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    from pkmlm.model.memory import ProductKeyMemory

    value_params = {id(m.values.weight) for m in model.modules() if isinstance(m, ProductKeyMemory)}
    decay, no_decay, values, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in value_params:
            values.append(p)
        elif p.ndim >= 2 and not isinstance(_owner(model, name), nn.Embedding) and not name.endswith("keys"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": cfg.lr, "peak_lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": cfg.lr, "peak_lr": cfg.lr, "weight_decay": 0.0},
        {"name": "memory_values", "params": values, "lr": cfg.values_lr, "peak_lr": cfg.values_lr,
         "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return model.get_submodule(module_name)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device):
    """torch AdamW over the three groups; with `optim.sparse_values=true`, a `SparseValuesAdamW`
    (AdamW + lazy row-sparse Adam for the values) after switching every memory layer to sparse
    value gradients (`ProductKeyMemory.sparse_grad`; see pkmlm/train/sparse_values.py)."""
    from pkmlm.model.memory import ProductKeyMemory

    # The fused CUDA kernel updates every tensor of a group in one launch (matters for the values table).
    fused = device.type == "cuda"
    if cfg.sparse_values:
        for module in model.modules():
            if isinstance(module, ProductKeyMemory):
                module.sparse_grad = True
        return SparseValuesAdamW(param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    return torch.optim.AdamW(param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


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


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
