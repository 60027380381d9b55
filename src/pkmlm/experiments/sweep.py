"""One sweep, one directory, one wandb group.

`hydra.sweep.dir` is `multirun/${pkmlm_sweep_name:${name}}/<time>`: every job of a sweep resolves
the master config's name there (the resolver is registered with the others in `pkmlm.config`,
`sweep_name`), so one sweep is one directory, and `sweep_group` makes that directory the wandb
group of all its jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# wandb caps a group name at 128 characters.
WANDB_GROUP_MAX = 128


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
