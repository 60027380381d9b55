"""The stateful pieces of a training run that the checkpoint layer knows (`states.States` holds
them with the others: data position, staleness, the loop's counters; train/states.py registers them).

- `ModelState`, `OptimizerState`: model and optimizer state through
  `torch.distributed.checkpoint.state_dict` (`get_*_state_dict` / `set_*_state_dict`), which names
  parameters the same way with and without DDP or FSDP2 wrappers and keeps DTensors sharded, so
  save and load never gather a model on one rank; saved as the checkpoint's tensors `model`, `optim`
  (torchtitan's ModelWrapper and OptimizersContainer, one piece each).
- `RngStreams`: python, numpy, torch CPU and every CUDA device (`rng_state` / `set_rng_state`), as
  plain JSON (a rank's file `rng/rank_XXXXX.json`).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


class ModelState:
    """The model's weights and buffers (fully qualified names, DTensors kept sharded). Frozen
    parameters are saved like any other."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class OptimizerState:
    """The optimizers' state, keyed by parameter names (as `ModelState`), so it loads on any wrapper."""

    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]):
        self.model, self.optimizers = model, list(optimizers)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizers, state)


class RngStreams:
    """This rank's RNG streams: `state_dict()` -> `{"rank_XXXXX": rng_state()}` (one file per rank)."""

    def __init__(self, rank: int):
        self.key = f"rank_{rank:05d}"

    def state_dict(self) -> dict[str, Any]:
        return {self.key: rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state[self.key])


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
