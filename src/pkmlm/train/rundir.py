"""The run directory: its lock, its saved config, and the check that a resume matches it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from pkmlm.config import PROJECT_ROOT
from pkmlm.errors import UserError

# Keys that may differ between a run's saved config and the config that resumes it (contract).
RESUME_MAY_DIFFER = ("train.stop_at_step", "train.max_steps", "resume", "logging.", "eval.interval", "paths.")


class RunLock:
    """An OS file lock on `run_dir/.lock`: two processes never write one run directory.

    The lock is `fcntl.flock` (through `filelock`), so the kernel releases it when the process
    dies, even by kill -9; a stale lock file never blocks a later run.
    """

    def __init__(self, run_dir: Path):
        from filelock import FileLock, Timeout

        self._timeout = Timeout
        self._lock = FileLock(str(run_dir / ".lock"))
        self.run_dir = run_dir

    def __enter__(self) -> "RunLock":
        try:
            self._lock.acquire(timeout=0)
        except self._timeout:
            raise UserError(
                f"run directory {self.run_dir} is in use by another process (its .lock is held); "
                "wait for it to finish or choose another hydra.run.dir"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ and are not allowed to differ on resume."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_DIFFER):
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            diffs.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return diffs


def code_version() -> dict[str, Any]:
    """The git commit of the project and whether the tree had uncommitted changes (when known)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
        return {"commit": commit or None, "dirty": dirty if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
