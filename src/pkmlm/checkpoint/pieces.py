"""The stateful pieces of a training run, each as a checkpoint stores it.

- `ModelAndOptimizers`: model and optimizer state through `torch.distributed.checkpoint.state_dict`
  (`get_state_dict` / `set_state_dict`), which names parameters the same way with and without DDP
  or FSDP2 wrappers and keeps DTensors sharded, so save and load never gather a model on one rank;
  saved as the checkpoint's tensors.
- RNG states (`rng_state` / `set_rng_state`): python, numpy, torch CPU and every CUDA device, as
  plain JSON (a rank's file `rng/rank_XXXXX.json`).
The data pipeline's state is already plain JSON (`data/shard_XXXXX.json`), and the loop's counters
are `pkmlm.train.state.TrainState` (in `meta.json`).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


class ModelAndOptimizers:
    """`state_dict()` -> `{"model": ..., "optim": ...}` (fully qualified names, DTensors kept
    sharded); `load_state_dict` puts such a dict back. Frozen parameters are saved like any other."""

    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]):
        self.model, self.optimizers = model, list(optimizers)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizers)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])


def model_state_template(model: nn.Module) -> dict[str, Any]:
    """`{"model": ...}` of `model` alone, for loading only the weights (evaluation, export)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {"model": get_model_state_dict(model)}


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state["model"])


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (torch's covers every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes seeds in [0, 2**32)
    torch.manual_seed(seed)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])
