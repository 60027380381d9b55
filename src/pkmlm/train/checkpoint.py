"""Checkpoints: complete, written atomically, verified on load, the last K kept.

A checkpoint is `checkpoints/step_{step:08d}.pt` (a `torch.save` of one dict) with a sidecar
`step_{step:08d}.pt.sha256`. Writing goes to a temporary file in the same directory, is fsynced,
then renamed over the final name (rename is atomic on POSIX), and the directory is fsynced; the
checksum is written after the payload, so a checkpoint without a matching checksum is incomplete
and is skipped on resume with a warning.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pkmlm.errors import UserError

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write `payload` as the checkpoint of `step`; then delete all but the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = directory / f"step_{step:08d}.pt"
    _atomic_write(path, data)
    _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, oldest first (by step)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify one checkpoint; raise ValueError when it is truncated or corrupt."""
    data = path.read_bytes()
    checksum = path.with_name(path.name + ".sha256")
    if not checksum.exists():
        raise ValueError(f"{path}: no checksum file (the write did not finish)")
    if hashlib.sha256(data).hexdigest() != checksum.read_text().strip():
        raise ValueError(f"{path}: checksum mismatch (truncated or corrupt)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def latest_valid_checkpoint(directory: Path, map_location="cpu") -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that loads and verifies; corrupt newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except Exception as e:  # any failure to read means: not a usable checkpoint
            warnings.warn(f"skipping unusable checkpoint {path}: {e}", stacklevel=2)
    return None


def resolve_resume(resume: str, run_dir: Path, map_location="cpu") -> Optional[tuple[Path, dict]]:
    """`auto`: newest valid checkpoint in run_dir (None when there is none); `never`: None;
    a path: that checkpoint file, or the newest valid one in that run directory."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_valid_checkpoint(run_dir / "checkpoints", map_location)
    path = Path(resume).expanduser()
    if path.is_dir():
        found = latest_valid_checkpoint(path / "checkpoints", map_location) or latest_valid_checkpoint(
            path, map_location
        )
        if found is None:
            raise UserError(f"resume={resume!r}: no valid checkpoint in that directory")
        return found
    if not path.is_file():
        raise UserError(f"resume={resume!r}: no such checkpoint file or run directory")
    try:
        return path, load_checkpoint(path, map_location)
    except ValueError as e:
        raise UserError(f"resume={resume!r}: {e}") from None
