"""Checks of user-given paths that never block and never create anything.

A path check must not `open()` what it checks: opening a FIFO waits for a writer for ever, and a
character device such as /dev/zero reads without end. So files are checked with `os.stat` (a
regular file, readable by this user) and directories by walking up to the first part that exists.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def file_problem(path: str | os.PathLike) -> Optional[str]:
    """Why `path` cannot be read as a data file (missing, not a regular file, not readable), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        return f"it is {kind}, not a regular file"
    if not os.access(path, os.R_OK):
        return "it is not readable by this user (permission denied)"
    return None


def dir_problem(path: str | os.PathLike) -> Optional[str]:
    """Why the directory `path` (existing or to be created) cannot be written, or None."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"no part of {path} exists"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None
