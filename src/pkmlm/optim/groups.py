"""Parameter groups and the optimizer that trains them.

Three groups:
- `decay`: weight matrices of attention, FFN and the memory's query network (weight decay);
- `no_decay`: norms, biases, embeddings and the memory's product keys (no decay, as in GPT-2 /
  nanoGPT practice for 1-D parameters and embeddings);
- `memory_values`: every memory value table, with `optim.values_lr` (the paper's 1e-3) and no
  weight decay: a row is only touched when selected, and decay would shrink rarely-read rows;
- `side_tables`: the tables of the side layers (`SideLayer.table_parameters`, e.g. Engram's hashed
  rows), with `optim.lr` x the layer's `tables_lr_mult` and no weight decay (one group per distinct
  multiplier), following the schedule.
Frozen parameters (`requires_grad=False`) belong to no group. With `optim.sparse_values=true` the
values and side tables take a lazy row-sparse Adam step (`lazy_adam.py`); `use_sparse_value_grads`
switches the memory and side layers to the sparse gradients it needs (the caller does it: building
an optimizer never changes the model).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from pkmlm.model.memory import ProductKeyMemory
from pkmlm.model.variants import SideLayer
from pkmlm.optim.config import OptimConfig
from pkmlm.optim.lazy_adam import SIDE_TABLES_GROUP, VALUES_GROUP, SparseValuesAdamW

Optimizer = Union[torch.optim.AdamW, SparseValuesAdamW]


def value_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each distinct memory value table's weight (a pool shared by several layers, once; PEER's
    down vectors too): `Transformer.value_tables`."""
    tables = model.value_tables() if hasattr(model, "value_tables") else {}
    return [t.weight for t in tables.values()]


def side_table_parameters(model: nn.Module) -> dict[int, tuple[nn.Parameter, float]]:
    """id -> (table, its learning-rate multiplier) for every side layer's tables (`SideLayer`)."""
    layers = model.side_layers().values() if hasattr(model, "side_layers") else ()
    return {id(p): (p, float(layer.tables_lr_mult)) for layer in layers for p in layer.table_parameters()}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    value_ids = {id(p) for p in value_parameters(model)}
    side = side_table_parameters(model)
    decay, no_decay, values, seen = [], [], [], set()
    side_groups: dict[float, list] = {}  # lr multiplier -> its tables
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in value_ids:
            values.append(p)
        elif id(p) in side:
            side_groups.setdefault(side[id(p)][1], []).append(p)
        elif p.ndim >= 2 and not isinstance(_owner(model, name), nn.Embedding) and not name.endswith("keys"):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": cfg.lr, "peak_lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": cfg.lr, "peak_lr": cfg.lr, "weight_decay": 0.0},
        {"name": VALUES_GROUP, "params": values, "lr": cfg.values_lr, "peak_lr": cfg.values_lr, "weight_decay": 0.0},
    ]
    for mult, params in side_groups.items():
        lr = cfg.lr * mult
        groups.append({"name": SIDE_TABLES_GROUP, "params": params, "lr": lr, "peak_lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _owner(model: nn.Module, param_name: str) -> nn.Module:
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return model.get_submodule(module_name)


def use_sparse_value_grads(model: nn.Module) -> None:
    """Every memory layer's value table and every side layer's tables take sparse COO gradients
    (for `optim.sparse_values`)."""
    for module in model.modules():
        if isinstance(module, (ProductKeyMemory, SideLayer)):
            module.sparse_grad = True


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> Optimizer:
    """torch AdamW over the three groups; with `optim.sparse_values=true`, a `SparseValuesAdamW`
    (AdamW + lazy row-sparse Adam for the values; call `use_sparse_value_grads(model)` too)."""
    # The fused CUDA kernel updates every tensor of a group in one launch (matters for the values table).
    fused = device.type == "cuda"
    if cfg.sparse_values:
        return SparseValuesAdamW(param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    return torch.optim.AdamW(param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def torch_optimizers(optimizer: Optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer` (for torch.distributed.checkpoint's state dicts)."""
    return optimizer.parts() if isinstance(optimizer, SparseValuesAdamW) else [optimizer]
