"""`optim.*` of the root config. Torch-free, so that `pkmlm.config` and the benchmarks import it
without building anything (`scripts/bench_model.py` builds the training optimizer with torch alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pkmlm.errors import require, require_one_of

Schedule = Literal["cosine", "inv_sqrt", "constant"]  # optim.schedule (pkmlm/optim/schedule.py)
ValuesSchedule = Literal["follow", "constant"]  # optim.values_schedule


@dataclass
class OptimConfig:
    lr: float = 3e-3
    # Memory values: their own LR and no weight decay. 1e-3 is the paper's (Lample et al. 2019,
    # section 4.2: values trained with a learning rate of 1e-3, sparse Adam).
    values_lr: float = 1e-3
    # follow: the values' LR follows the model's warmup + decay schedule (scaled to values_lr);
    # constant: values_lr at every step, warmup included, as XLM's sparse-Adam values and Memory
    # Layers at Scale (Berges et al. 2024) train them.
    values_schedule: str = "follow"
    weight_decay: float = 0.1  # on matrices only; norms, biases, embeddings and keys get none
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # 0.95 rather than 0.999: steadier LM training (GPT-3, nanoGPT)
    eps: float = 1e-8  # AdamW denominator epsilon
    schedule: str = "cosine"  # cosine | inv_sqrt | constant (all after a linear warmup)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of the peak LR
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Max grad norm of the memory value tables, clipped apart from the rest (Memory Layers at Scale
    # clips the values separately: their gradient is sparse and its norm unlike the dense ones').
    # 0: the values are clipped together with everything else by optim.grad_clip.
    values_grad_clip: float = 0.0
    # Memory values get row-sparse gradients and a lazy Adam step that touches only the rows read
    # this step (moments of unread rows are not decayed; see pkmlm/optim/lazy_adam.py). False: AdamW.
    sparse_values: bool = False

    def validate(self) -> None:
        """Raise `ConfigError` on the first bad `optim.*` value."""
        require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", self.lr, "a positive finite number")
        require(self.values_lr >= 0 and math.isfinite(self.values_lr), "optim.values_lr", self.values_lr, ">= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "in [0, 1)")
        require(
            self.eps > 0 and math.isfinite(self.eps),
            "optim.eps",
            self.eps,
            "a positive finite number (AdamW's denominator)",
        )
        require_one_of("optim.schedule", self.schedule, Schedule)
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        require(
            self.values_grad_clip >= 0 and math.isfinite(self.values_grad_clip),
            "optim.values_grad_clip",
            self.values_grad_clip,
            ">= 0 (0: the values are clipped with the rest by optim.grad_clip)",
        )
        require_one_of("optim.values_schedule", self.values_schedule, ValuesSchedule)
