"""One sweep, one directory, one wandb group.

`hydra.sweep.dir` is `multirun/${pkmlm_sweep_name:${name}}/<time>`. Hydra composes every job of a
sweep anew with its own overrides, so a job that selects another experiment (a compare group's
arms, `-m experiment=tiny/mem4,tiny/dense8`) has another `name`, and `multirun/${name}/...` would
scatter one sweep over several directories. `pkmlm_sweep_name` returns the name that the sweep's
own (master) config resolved, for every job: the first value it returns is kept in the config's
resolver cache, the same cache through which Hydra gives every job the master's `${now:...}`
(`ConfigLoader.load_sweep_config` copies it into each job's config, and it travels with the
config to joblib and SLURM workers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

RESOLVER = "pkmlm_sweep_name"

# wandb caps a group name at 128 characters.
WANDB_GROUP_MAX = 128


def sweep_name(name: str, *, _root_: Any) -> str:
    """`name` the first time a config tree (and the copies Hydra makes of its cache) asks."""
    memo = OmegaConf.get_cache(_root_)[RESOLVER]  # a dict per resolver name (omegaconf: defaultdict)
    return memo.setdefault("first", name)


def register_sweep_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, sweep_name)


def sweep_group(sweep_dir: str | Path, cwd: Optional[Path] = None) -> str:
    """The wandb group of every job of the sweep in `sweep_dir`: that directory, relative to the
    working directory when below it (`multirun/compare/tiny_mem_vs_dense/2026-11-25_22-14-35`),
    keeping its last 128 characters (wandb's limit; the time stamp at the end is what differs)."""
    path = Path(sweep_dir)
    cwd = (cwd or Path.cwd()).resolve()
    try:
        text = str(path.resolve().relative_to(cwd))
    except ValueError:
        text = str(path)
    return text[-WANDB_GROUP_MAX:]
