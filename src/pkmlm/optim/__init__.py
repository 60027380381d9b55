"""Optimisation: parameter groups, LR schedules, lazy row-sparse Adam for the value tables (with
its triton row kernel) and gradient clipping. Needs torch and the model only."""

from pkmlm.optim.clip import clip_grad_norm_, clip_gradients_
from pkmlm.optim.config import OptimConfig
from pkmlm.optim.groups import (
    VALUES_GROUP,
    build_optimizer,
    param_groups,
    torch_optimizers,
    use_sparse_value_grads,
    value_parameters,
)
from pkmlm.optim.lazy_adam import LazyAdam, SparseValuesAdamW
from pkmlm.optim.schedule import lr_factor, set_lr

__all__ = [
    "VALUES_GROUP",
    "LazyAdam",
    "OptimConfig",
    "SparseValuesAdamW",
    "build_optimizer",
    "clip_grad_norm_",
    "clip_gradients_",
    "lr_factor",
    "param_groups",
    "set_lr",
    "torch_optimizers",
    "use_sparse_value_grads",
    "value_parameters",
]
