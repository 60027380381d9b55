"""Checkpoints: one store (torch.distributed.checkpoint + JSON, verified by a SHA-256 manifest,
loaded without running code) for one and many processes; the stateful pieces it holds."""

from pkmlm.checkpoint.files import atomic_write
from pkmlm.checkpoint.store import (
    CheckpointWriteError,
    checkpoint_path,
    find_for_reading,
    latest_valid,
    list_checkpoints,
    read,
    read_meta,
    resolve,
    verify,
    write,
)
from pkmlm.errors import NotACheckpointError, UnsafeCheckpointError

__all__ = [
    "CheckpointWriteError",
    "NotACheckpointError",
    "UnsafeCheckpointError",
    "atomic_write",
    "checkpoint_path",
    "find_for_reading",
    "latest_valid",
    "list_checkpoints",
    "read",
    "read_meta",
    "resolve",
    "verify",
    "write",
]
