"""The export format of `pkmlm-export`: `model.safetensors` + `config.json` + `tokenizer.json`.

Read here, below `train/` and `run`, because both read it: `pkmlm.load_run` (an export back in
Python) and `init_from=EXPORT` (a run starting from an export's weights). Safe by construction:
safetensors holds tensors only and the rest is JSON, so nothing read can run code. The one module of
`checkpoint/` that knows the model's config (the store itself stores dicts of tensors and JSON).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pkmlm.errors import UserError
from pkmlm.model.memory import MemoryConfig
from pkmlm.model.transformer import ModelConfig

EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def model_config_from_dict(d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mem_fields = {f.name for f in dataclasses.fields(MemoryConfig)}
    memory = MemoryConfig(**{k: v for k, v in d.get("memory", {}).items() if k in mem_fields})
    return ModelConfig(**{k: v for k, v in d.items() if k in fields and k != "memory"}, memory=memory)


def is_export(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model.safetensors").is_file()


def read_export(path: Path, key: str = "checkpoint") -> dict:
    """An export's `config.json` (model config, run config, step, tokens) with its tokenizer's JSON
    under `tokenizer`, as a checkpoint's meta.json holds them; one-line `UserError` when broken."""
    try:
        info = json.loads((path / "config.json").read_text())
        info["step"], info["tokens"] = int(info["step"]), int(info["tokens"])
        model_config_from_dict(info["model_config"])
        info["tokenizer"] = (path / "tokenizer.json").read_text()
    except FileNotFoundError as e:
        raise UserError(
            f"{key}={str(path)!r}: an export without {Path(e.filename).name}; an export holds {', '.join(EXPORT_FILES)}"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{key}={str(path)!r}: not a pkmlm export ({type(e).__name__}: {e})") from None
    return info


def load_export_weights(model: torch.nn.Module, path: Path, key: str = "checkpoint") -> None:
    """The weights of export `path` into `model` (safetensors: no pickled object is unpickled);
    one-line `UserError` when they do not fit it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        # load_model, not load_file: the file holds a tied tensor once, under one of its names
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError) as e:
        raise UserError(f"{key}={str(path)!r}: not a pkmlm export ({type(e).__name__}: {e})") from None
    if missing or unexpected:
        raise UserError(
            f"{key}={str(path)!r}: the weights do not fit the model of its config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
