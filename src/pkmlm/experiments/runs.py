"""Finished (or running) runs read back from their directories, summarised for comparison.

A run directory holds `config.yaml` and `metrics.jsonl` (docs/architecture.md, "Run directory"); the
jobs of a Hydra sweep sit in `<sweep dir>/<job number>/` beside the sweep's `multirun.yaml`, each
with its overrides in `.hydra/overrides.yaml`. Parameter counts and FLOPs come from the run's own
final row when it has one, else from its config: the model is built on the meta device (no
memory is allocated, so a paper-size model costs nothing).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pkmlm.errors import UserError

__all__ = ["RunSummary", "find_run_dirs", "load_runs", "summarise", "matching_report"]

_MEMORY_KEY = re.compile(r"^memory/layer(\d+)/(usage|kl_weight|kl_count)$")
# Settings that must agree for a fair comparison (same tokens in the same order, same schedule).
MATCHED_KEYS = (
    "data",
    "seed",
    "train.batch_size",
    "train.max_steps",
    "train.max_tokens",
    "train.max_time",
    "optim",
    "eval.max_batches",
    "eval.batch_size",
)


@dataclass
class RunSummary:
    """What the comparison table says about one run (None: not measured / not in the files)."""

    path: Path
    label: str
    config: dict
    rows: list = field(repr=False)
    name: str = ""
    n_layers: Optional[int] = None
    dim: Optional[int] = None
    memory_layers: list = field(default_factory=list)
    memory_values: Optional[int] = None  # n_keys**2 per memory layer
    params_total: Optional[int] = None
    params_active: Optional[int] = None
    flops_per_token: Optional[float] = None
    tokens: Optional[int] = None
    steps: Optional[int] = None
    wall_time_s: Optional[float] = None
    train_time_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    step_time_s: Optional[float] = None
    data_time_s: Optional[float] = None
    compute_time_s: Optional[float] = None
    mfu: Optional[float] = None
    flops_per_s: Optional[float] = None
    peak_memory_gb: Optional[float] = None
    best_ppl: Optional[float] = None
    final_ppl: Optional[float] = None
    final_ppl_step: Optional[int] = None
    stopped_by: Optional[str] = None
    memory: dict = field(default_factory=dict)  # layer -> {"usage", "kl_weight", "kl_count"}
    tokenizer_sha256: Optional[str] = None


# --- finding runs ---------------------------------------------------------------------------------


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def _natural_key(path: Path) -> list:
    """`2` before `10`: job numbers sort as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_run_dirs(path: str | os.PathLike) -> list[Path]:
    """`path` itself if it is a run directory, else every run directory below it (a sweep
    directory, a folder of sweeps), in natural order; UserError when there is none."""
    root = Path(path)
    if not root.exists():
        raise UserError(
            f"{str(path)!r}: no such directory; give run or sweep directories "
            "(each run directory holds config.yaml and metrics.jsonl)"
        )
    if not root.is_dir():
        raise UserError(f"{str(path)!r} is not a directory; give run or sweep directories")
    if _is_run_dir(root):
        return [root]
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("checkpoints", "wandb", ".hydra", ".submitit")]
        if _is_run_dir(Path(dirpath)):
            found.append(Path(dirpath))
            dirnames[:] = []  # a run directory holds no further runs
    if not found:
        raise UserError(
            f"{str(path)!r} holds no run directory (config.yaml + metrics.jsonl); "
            "give a run directory or a sweep directory (multirun/<name>/<time>)"
        )
    return sorted(found, key=_natural_key)


# --- labels ----------------------------------------------------------------------------------------


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


def _override_label(override: str) -> str:
    """`+experiment/tiny=mem4` -> `tiny/mem4`; `experiment=tiny/mem4` -> `tiny/mem4`; others as given."""
    key, _, value = override.lstrip("+~").partition("=")
    if key == "experiment" or key.startswith("experiment/"):
        group = key[len("experiment") :].strip("/")
        return f"{group}/{value}" if group else value
    return f"{key}={value}"


def _labels(run_dirs: list[Path], names: list[str]) -> list[str]:
    """Per run: within its sweep, the overrides in which its jobs differ; else its config name.
    Duplicates get their directory appended."""
    by_parent: dict[Path, list[int]] = {}
    for i, run_dir in enumerate(run_dirs):
        by_parent.setdefault(run_dir.parent, []).append(i)
    labels = list(names)
    for members in by_parent.values():
        if len(members) < 2:
            continue
        # job -> {override key: the whole override}, e.g. {"model.memory.layers": "model.memory.layers=[2]"}
        parsed = {i: {o.lstrip("+~").split("=", 1)[0]: o for o in _overrides(run_dirs[i])} for i in members}
        keys = sorted({k for overrides in parsed.values() for k in overrides})
        varying = [k for k in keys if len({parsed[i].get(k) for i in members}) > 1]
        for i in members:
            parts = [_override_label(parsed[i][k]) for k in varying if k in parsed[i]]
            if parts:
                labels[i] = ", ".join(parts)
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return [
        f"{label} [{run_dir.parent.name}/{run_dir.name}]" if counts[label] > 1 else label
        for label, run_dir in zip(labels, run_dirs)
    ]


# --- reading and summarising ---------------------------------------------------------------------


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _mean(values: list) -> Optional[float]:
    values = [v for v in (_finite(x) for x in values) if v is not None]
    return sum(values) / len(values) if values else None


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _model_counts(config: dict, where: Path) -> tuple[Optional[dict], Optional[float]]:
    """Parameter counts and active FLOPs per token of the run's model, built on the meta device."""
    import torch

    from pkmlm.checkpoint.export import model_config_from_dict
    from pkmlm.model.transformer import Transformer

    try:
        model_cfg = model_config_from_dict(config["model"])
        with torch.device("meta"):
            model = Transformer(model_cfg)
        seq_len = int(_get(config, "data.seq_len") or model_cfg.max_seq_len)
        return model.count_parameters(), model.flops_per_token(seq_len)
    except Exception as error:  # noqa: BLE001 - an unreadable config leaves the counts blank
        warnings.warn(
            f"{where}: cannot build the run's model from it ({error}); parameter counts left blank", stacklevel=2
        )
        return None, None


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# Keys whose values the table reads as numbers; a row holding anything else there (a hand-edited
# or foreign metrics.jsonl) has that value dropped, with one warning per file.
_NUMERIC = (
    "tokens",
    "wall_time_s",
    "train_time_s",
    "val/ppl",
    "train/tokens_per_s",
    "train/step_time_s",
    "train/data_time_s",
    "train/compute_time_s",
    "train/mfu",
    "train/peak_memory_gb",
    "params_total",
    "params_active",
    "flops_per_token",
)


def read_rows(path: Path, warn_unreadable: bool = True) -> list[dict]:
    """The metrics rows of `path`, each value the table reads a number (or dropped), with one
    warning naming the file for lines that are no rows (a torn last line excepted: normal for a
    killed run; none when `warn_unreadable` is false) and one for values of the wrong type."""
    from pkmlm.metrics.sinks import read_metrics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_metrics(path)
    if caught and warn_unreadable and rows:
        first = str(caught[0].message).removeprefix(f"{path}:")
        warnings.warn(
            f"{path}: {len(caught)} line(s) are not metrics rows and were skipped (first: line {first})", stacklevel=2
        )
    dropped = []
    for row in rows:
        for key in _NUMERIC:
            if (
                key in row
                and row[key] is not None
                and _finite(row[key]) is None
                and not (isinstance(row[key], float) and not math.isfinite(row[key]))
            ):
                dropped.append(f"{key}={row.pop(key)!r}")
        if "stopped_by" in row and not isinstance(row["stopped_by"], (str, type(None))):
            dropped.append(f"stopped_by={row.pop('stopped_by')!r}")
    if dropped:
        warnings.warn(f"{path}: {len(dropped)} value(s) of the wrong type ignored (first: {dropped[0]})", stacklevel=2)
    return rows


def summarise(
    run_dir: Path, label: str, config: Optional[dict] = None, rows: Optional[list[dict]] = None
) -> RunSummary:
    """The run in `run_dir`; `config` is its config.yaml and `rows` its metrics when already read."""
    if config is None:
        config = read_config(run_dir)
    if rows is None:
        rows = read_rows(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if _finite(r.get("val/ppl")) is not None]
    finals = [r for r in rows if "stopped_by" in r]
    final = finals[-1] if finals else {}
    memory_cfg = _get(config, "model.memory")
    memory_cfg = memory_cfg if isinstance(memory_cfg, dict) else {}
    layers = memory_cfg.get("layers")
    s = RunSummary(
        path=run_dir,
        label=label,
        config=config,
        rows=rows,
        name=str(config.get("name", "")),
        n_layers=_int(_get(config, "model.n_layers")),
        dim=_int(_get(config, "model.dim")),
        memory_layers=[i for i in layers if _int(i) is not None] if isinstance(layers, list) else [],
    )
    if s.memory_layers and _int(memory_cfg.get("n_keys")):
        s.memory_values = memory_cfg["n_keys"] ** 2

    counts, flops = (None, None)
    if _int(final.get("params_total")) is not None and _finite(final.get("flops_per_token")) is not None:
        s.params_total, s.params_active = final["params_total"], _int(final.get("params_active"))
        s.flops_per_token = final["flops_per_token"]
    else:
        counts, flops = _model_counts(config, run_dir / "config.yaml")
        if counts is not None:
            s.params_total, s.params_active, s.flops_per_token = counts["total"], counts["active"], flops

    if rows:
        s.steps = max(r["step"] for r in rows)
        s.tokens = max((_int(r.get("tokens")) or 0) for r in rows)
    s.wall_time_s = _finite(final.get("wall_time_s")) or max(
        (t for t in (_finite(r.get("wall_time_s")) for r in rows) if t is not None), default=None
    )
    s.train_time_s = _finite(final.get("train_time_s")) or max(
        (t for t in (_finite(r.get("train_time_s")) for r in rows) if t is not None), default=None
    )
    if s.train_time_s and s.tokens:
        s.tokens_per_s = s.tokens / s.train_time_s
    else:
        s.tokens_per_s = _mean([r.get("train/tokens_per_s") for r in train_rows])
    s.step_time_s = _mean([r.get("train/step_time_s") for r in train_rows])
    s.data_time_s = _mean([r.get("train/data_time_s") for r in train_rows])
    s.compute_time_s = _mean([r.get("train/compute_time_s") for r in train_rows])
    s.mfu = _mean([r.get("train/mfu") for r in train_rows])
    if s.flops_per_token and s.tokens_per_s:
        s.flops_per_s = s.flops_per_token * s.tokens_per_s
    s.peak_memory_gb = max(
        (m for m in (_finite(r.get("train/peak_memory_gb")) for r in train_rows) if m is not None), default=None
    )
    if val_rows:
        s.best_ppl = min(float(r["val/ppl"]) for r in val_rows)
        s.final_ppl, s.final_ppl_step = float(val_rows[-1]["val/ppl"]), val_rows[-1]["step"]
        for key, value in val_rows[-1].items():
            m = _MEMORY_KEY.match(key)
            if m:
                s.memory.setdefault(int(m.group(1)), {})[m.group(2)] = _finite(value)
    s.stopped_by = final.get("stopped_by")
    tokenizer = run_dir / "tokenizer.json"
    if tokenizer.is_file():
        s.tokenizer_sha256 = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    return s


def read_config(run_dir: Path) -> dict:
    """The run's config.yaml, or a UserError naming it when it is no YAML mapping."""
    path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(path.read_bytes()) or {}
    except (yaml.YAMLError, OSError) as error:
        raise UserError(
            f"{path}: not readable YAML ({error.__class__.__name__}); leave this run out or restore its config.yaml"
        ) from None
    if not isinstance(config, dict):
        raise UserError(
            f"{path}: not a run's config (a YAML {type(config).__name__}, not a mapping); "
            "leave this run out or restore its config.yaml"
        )
    return config


def load_runs(paths: list[str]) -> list[RunSummary]:
    """Every run under `paths` (run or sweep directories), each once, labelled. A run without a
    readable metrics row is left out with a warning naming its metrics.jsonl."""
    run_dirs: list[Path] = []
    seen = set()
    for path in paths:
        for run_dir in find_run_dirs(path):
            key = run_dir.resolve()
            if key not in seen:
                seen.add(key)
                run_dirs.append(run_dir)
    configs = [read_config(run_dir) for run_dir in run_dirs]
    rows = [read_rows(run_dir / "metrics.jsonl") for run_dir in run_dirs]
    kept = [i for i, run_rows in enumerate(rows) if run_rows]
    if not kept:
        raise UserError(
            f"no run under {', '.join(map(repr, paths))} has a readable metrics row "
            "(metrics.jsonl holds JSON objects, one per line); nothing to compare"
        )
    for run_dir, run_rows in zip(run_dirs, rows):
        if not run_rows:
            warnings.warn(f"{run_dir / 'metrics.jsonl'}: no readable metrics row; run left out", stacklevel=2)
    run_dirs, configs, rows = [run_dirs[i] for i in kept], [configs[i] for i in kept], [rows[i] for i in kept]
    labels = _labels(run_dirs, [str(c.get("name") or d.name) for c, d in zip(configs, run_dirs)])
    return [
        summarise(run_dir, label, config, run_rows)
        for run_dir, label, config, run_rows in zip(run_dirs, labels, configs, rows)
    ]


def _flatten(config: dict, prefix: str) -> dict:
    node = _get(config, prefix)
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flatten(config, f"{prefix}.{key}") if isinstance(value, dict) else {f"{prefix}.{key}": value})
    return out


def matching_report(runs: list[RunSummary]) -> list[str]:
    """Lines saying whether the runs were matched (same data and order, tokenizer, seed, batch,
    schedule), and naming every setting in which they differ."""
    if len(runs) < 2:
        return []
    differing = []
    for prefix in MATCHED_KEYS:
        flat = [_flatten(r.config, prefix) for r in runs]
        for key in sorted({k for f in flat for k in f}):
            values = [f.get(key) for f in flat]
            if len({repr(v) for v in values}) > 1:
                shown = "; ".join(f"{r.label}: {v}" for r, v in zip(runs, values))
                differing.append(f"- differs: `{key}` ({shown})")
    if len({r.tokenizer_sha256 for r in runs}) > 1:
        differing.append("- differs: the tokenizer (tokenizer.json is not the same file in every run)")
    token_counts = {r.tokens for r in runs}
    lines = []
    if differing:
        lines.append("Not matched in everything:")
        lines += differing
    else:
        lines.append(
            f"Matched: all {len(runs)} runs share data (files, order, windows), tokenizer, seed, "
            "batch size and schedule."
        )
    if len(token_counts) > 1:
        lines.append(
            "- the runs saw different numbers of tokens: "
            + "; ".join(
                f"{r.label}: {r.tokens:,} ({r.stopped_by or 'unfinished'})" for r in runs if r.tokens is not None
            )
        )
    return lines
