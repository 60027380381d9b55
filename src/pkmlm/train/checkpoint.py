"""Checkpoints: complete, written atomically, verified on load, the last K kept.

A checkpoint is `checkpoints/step_{step:08d}.pt` (a `torch.save` of one dict) with a sidecar
`step_{step:08d}.pt.sha256` (the hex SHA-256 of the payload, as `sha256sum` prints it). Writing
goes to a temporary file in the same directory, is fsynced, then renamed over the final name
(rename is atomic on POSIX), and the directory is fsynced; the checksum is written the same way
after the payload, so a checkpoint without a matching checksum is incomplete (or was damaged
later) and is skipped on resume with a warning.

Rules that keep the directory one consistent timeline (docs/reliability.md):
- a valid checkpoint is never overwritten: writing a step whose checkpoint already verifies keeps
  the existing one (the state at a step is reproducible from it; replacing it would open a window
  in which that step has no valid checkpoint);
- saving step s removes checkpoints of steps > s: after a resume from s they are either corrupt
  (that is why s was chosen) or from a timeline the user rewound with `resume=PATH`, and
  `resume=auto` must never jump back onto them;
- temporary files left by a killed writer (`.step_*.pt.tmp.<pid>`) are removed at the next save
  (the run directory's lock guarantees no other writer is alive);
- a failed write (full disk, quota, file-size limit, I/O error) raises `CheckpointWriteError`, a
  one-line user error naming the file, the OS error and the intact previous checkpoint.
"""

from __future__ import annotations

import errno
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
_TMP = re.compile(r"^\.step_\d{8}\.pt(\.sha256)?\.tmp\.(\d+)$")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the OS refused: full disk, quota, size limit, I/O)."""


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (torch's covers every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes seeds in [0, 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the loop draws from: python, numpy, torch CPU, and all CUDA devices when present."""
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


def fsync_dir(path: Path) -> None:
    """Make a rename or deletion in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_fully(fd: int, data: bytes) -> None:
    """os.write until every byte is out: a regular file may take a write in parts."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # a regular file only does this when it cannot grow
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`, never a
    part: temporary file in the same directory, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_fully(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def checkpoint_step(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_XXXXXXXX.pt)")
    return int(match.group(1))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _checksum_problem(path: Path, data: bytes) -> Optional[str]:
    """None when `data` (the bytes of `path`) matches the sidecar checksum; otherwise why not."""
    checksum = _sidecar(path)
    if not checksum.exists():
        return f"{path}: no checksum file (the write did not finish)"
    if hashlib.sha256(data).hexdigest() != checksum.read_text().strip():
        return f"{path}: checksum mismatch (truncated or corrupt)"
    return None


def verify_checkpoint(path: Path) -> Optional[str]:
    """None when `path` matches its checksum; otherwise why not (one line). Reads, does not unpickle."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or e})"
    return _checksum_problem(path, data)


def _remove_stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files of writers that no longer run (killed mid-write); ours are kept."""
    stale = [p for p in directory.iterdir() if (m := _TMP.match(p.name)) and int(m.group(2)) != os.getpid()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any], keep_last: int) -> Path:
    """Write `payload` as the checkpoint of `step`; then delete all but the newest `keep_last`.

    Raises `CheckpointWriteError` (a `UserError`) when the OS refuses the write; the checkpoints
    already on disk are untouched then.
    """
    directory = Path(directory)
    path = checkpoint_path(directory, step)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(directory)
        if not (path.exists() and verify_checkpoint(path) is None):  # never replace a valid one
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getvalue()
            # The payload first, then its checksum: a crash between the two leaves a payload whose
            # checksum is missing (or stale), which loading refuses.
            atomic_write(path, data)
            atomic_write(_sidecar(path), hashlib.sha256(data).hexdigest().encode())
    except OSError as e:
        previous = [p for p in list_checkpoints(directory) if checkpoint_step(p) < step and verify_checkpoint(p) is None]
        intact = (f"the previous checkpoint {previous[-1].name} is intact" if previous
                  else "there is no earlier valid checkpoint")
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {e.strerror or e} (errno {errno.errorcode.get(e.errno, e.errno)}); "
            f"{intact}; free space (or fix the file system) under {directory} and resume with resume=auto"
        ) from None
    prune_checkpoints(list_checkpoints(directory), step, keep_last, checkpoint_step, _delete)
    return path


def prune_checkpoints(checkpoints: list, step: int, keep_last: int, step_of, delete) -> None:
    """The retention rule of both formats, after writing `step`: checkpoints (oldest first) newer
    than `step` go (the run continued from an older one), then all but the last `keep_last`."""
    kept = []
    for path in checkpoints:
        if step_of(path) > step:
            warnings.warn(f"removing checkpoint {path.name}: newer than step {step}, which this run continued "
                          "from (it was unusable, or the run was rewound with resume=PATH)", stacklevel=3)
            delete(path)
        else:
            kept.append(path)
    for old in kept[:-keep_last]:
        delete(old)


def _delete(path: Path) -> None:
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in `directory`, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify one checkpoint; raise ValueError when it is truncated or corrupt."""
    path = Path(path)
    data = path.read_bytes()
    problem = _checksum_problem(path, data)
    if problem is not None:
        raise ValueError(problem)
    # weights_only=False: the payload holds numpy RNG state and plain containers, written by us and
    # verified by its checksum just above.
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def latest_valid_checkpoint(directory: Path, map_location="cpu") -> Optional[tuple[Path, dict]]:
    """The newest checkpoint that loads and verifies; corrupt newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except Exception as e:  # any failure to read means: not a usable checkpoint
            warnings.warn(f"skipping unusable checkpoint {path}: {e}", stacklevel=2)
    return None


def damaged_checkpoints_error(directory: Path, damaged: list[str]) -> UserError:
    """`resume=auto` found no valid checkpoint, but the `damaged` ones were complete once (both formats)."""
    return UserError(
        f"resume=auto: no checkpoint in {directory} verifies, though {', '.join(damaged[-3:])} "
        "was written completely and has been damaged since; restore it from a copy, give another with "
        "resume=PATH, or start over with resume=never"
    )


def resolve_resume(resume: str, run_dir: Path, map_location="cpu") -> Optional[tuple[Path, dict]]:
    """`auto`: newest valid checkpoint in run_dir (None when there is none); `never`: None;
    a path: that checkpoint file, or the newest valid one in that run directory."""
    if resume == "never":
        return None
    if resume == "auto":
        directory = Path(run_dir) / "checkpoints"
        found = latest_valid_checkpoint(directory, map_location)
        # None valid: a fresh start, unless one of them was complete once (it has its checksum) and
        # was damaged since; starting over silently would throw that training away.
        damaged = [p.name for p in list_checkpoints(directory) if _sidecar(p).exists()] if found is None else []
        if damaged:
            raise damaged_checkpoints_error(directory, damaged)
        return found
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
        raise UserError(f"resume={resume!r}: {e}; give another checkpoint or resume=auto") from None
    except Exception as e:  # verified bytes that do not unpickle: written by something else
        raise UserError(f"resume={resume!r} is not a pkmlm checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
