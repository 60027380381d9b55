"""The export format of `pkmlm-export`: `model.safetensors` + `config.json` + `tokenizer.json`.

Read here, below `train/` and `run`, because both read it: `pkmlm.load_run` (an export back in
Python) and `init_from=EXPORT` (a run starting from an export's weights). Safe by construction:
safetensors holds tensors only and the rest is JSON, so nothing read can run code. The one module of
`checkpoint/` that knows the model's config (the store itself stores dicts of tensors and JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from pkmlm.errors import UserError
from pkmlm.model.memory import MemoryConfig
from pkmlm.model.transformer import ModelConfig, Transformer
from pkmlm.paths import file_problem

EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def model_config_from_dict(d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mem_fields = {f.name for f in dataclasses.fields(MemoryConfig)}
    memory = MemoryConfig(**{k: v for k, v in d.get("memory", {}).items() if k in mem_fields})
    return ModelConfig(**{k: v for k, v in d.items() if k in fields and k != "memory"}, memory=memory)


def available_ram() -> float:
    """Bytes of RAM this process may still use (MemAvailable), for the loading guard."""
    try:
        with open("/proc/meminfo") as f:
            return float(next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")))
    except (OSError, StopIteration, ValueError):
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def checked_model_config(d: object, where: str) -> ModelConfig:
    """The schema check of a saved model config (a checkpoint's `model_config`, an export's
    config.json): a mapping whose fields build a model, and a model whose weights fit in memory (the
    loading side of training's memory estimate: parameters counted on the meta device, nothing
    allocated). One-line `UserError` naming `where` otherwise."""
    if not isinstance(d, dict) or not isinstance(d.get("memory", {}), dict):
        raise UserError(f"{where}: 'model_config' is {type(d).__name__}, not a mapping; the file was edited")
    try:
        cfg = model_config_from_dict(d)
        with torch.device("meta"):
            n_params = sum(p.numel() for p in Transformer(cfg).parameters())
    except Exception as e:  # noqa: BLE001 - any value that cannot build the model is a bad file
        raise UserError(
            f"{where}: 'model_config' does not describe a model ({type(e).__name__}: {str(e)[:120]}); "
            "the file was edited"
        ) from None
    need, have = n_params * 4.0, available_ram()
    if need > have:
        raise UserError(
            f"{where}: 'model_config' describes a model of {n_params:.3g} parameters, about {need / 1e9:,.1f} GB "
            f"to load, but this machine has {have / 1e9:.1f} GB of RAM available; the file was edited, or "
            "load it on a larger machine"
        )
    return cfg


def safetensors_problem(file: Path, model: torch.nn.Module) -> str | None:
    """The schema check of an export's weights, from the safetensors header alone (8 bytes of
    length, then JSON): every key the model has (a tied tensor under one of its names), no other,
    each with the model's shape and dtype. None when they fit."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size or n > 100 << 20:
                return f"{file}: not a safetensors file (header length {n} of a {size}-byte file)"
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{file}: not a safetensors file ({type(e).__name__})"
    if not isinstance(header, dict):
        return f"{file}: not a safetensors file (its header is not a mapping)"
    header.pop("__metadata__", None)
    state = model.state_dict()
    groups: dict[int, set[str]] = {}  # tied tensors: one storage, several names
    for name, t in state.items():
        groups.setdefault(t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), set()).add(name)
    for name in sorted(header):
        if name not in state:
            return f"{file}: holds {name!r}, which the model of its config.json does not have"
        entry, t = header[name], state[name]
        if not isinstance(entry, dict) or list(entry.get("shape", [])) != list(t.shape):
            shape = entry.get("shape") if isinstance(entry, dict) else entry
            return f"{file}: {name!r} has shape {shape}, the model of its config.json {list(t.shape)}"
        dtype = str(t.dtype).removeprefix("torch.")
        short = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "bool": "BOOL"}
        if entry.get("dtype") != short.get(dtype, entry.get("dtype")):
            return f"{file}: {name!r} is {entry.get('dtype')}, the model's is {short.get(dtype, dtype)}"
    missing = sorted(next(iter(sorted(g))) for g in groups.values() if not g & set(header))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"{file}: lacks {missing[0]!r}{more}, which the model needs"
    return None


def is_export(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model.safetensors").is_file()


def read_export(path: Path, key: str = "checkpoint") -> dict:
    """An export's `config.json` (model config, run config, step, tokens) with its tokenizer's JSON
    under `tokenizer`, as a checkpoint's meta.json holds them; one-line `UserError` when broken."""
    for name in EXPORT_FILES:  # stat only: a FIFO would block the read for ever
        problem = file_problem(path / name)
        if problem is not None and (path / name).exists():
            raise UserError(f"{key}={str(path)!r}: {name}: {problem}; an export holds regular files only")
    try:
        info = json.loads((path / "config.json").read_text())
        if not isinstance(info, dict):
            raise TypeError(f"config.json holds a {type(info).__name__}, not a mapping")
        for field in ("step", "tokens"):
            if isinstance(info[field], bool) or not isinstance(info[field], int) or info[field] < 0:
                raise TypeError(f"config.json field {field!r} is {info[field]!r}, not an integer >= 0")
        if not isinstance(info.get("config", {}), dict):
            raise TypeError("config.json field 'config' is not a mapping")
        checked_model_config(info["model_config"], f"{key}={str(path)!r}: config.json")
        info["tokenizer"] = (path / "tokenizer.json").read_text()
    except FileNotFoundError as e:
        raise UserError(
            f"{key}={str(path)!r}: an export without {Path(e.filename).name}; an export holds {', '.join(EXPORT_FILES)}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{key}={str(path)!r}: not a pkmlm export ({type(e).__name__}: {e})") from None
    return info


def load_export_weights(model: torch.nn.Module, path: Path, key: str = "checkpoint") -> None:
    """The weights of export `path` into `model` (safetensors: no pickled object is unpickled);
    one-line `UserError` when they do not fit it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    problem = safetensors_problem(path / "model.safetensors", model)
    if problem is not None:
        raise UserError(f"{key}={str(path)!r}: {problem}")
    try:
        # load_model, not load_file: the file holds a tied tensor once, under one of its names
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError) as e:
        raise UserError(f"{key}={str(path)!r}: not a pkmlm export ({type(e).__name__}: {e})") from None
    if missing or unexpected:
        raise UserError(
            f"{key}={str(path)!r}: the weights do not fit the model of its config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
