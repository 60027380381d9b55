"""Durable files: atomic writes and SHA-256 manifests (`sha256sum` format).

`atomic_write` leaves a path holding either its old content or all of the new, never a part:
temporary file in the same directory, fsync, rename (atomic on POSIX), fsync of the directory.
A manifest lists the SHA-256 of every file of a directory, so that damage after the write (a bit
flip, a truncation, a missing file) is found before anything is deserialised, and can be checked
by hand with `sha256sum -c checksums.sha256`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "checksums.sha256"


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
    """Write `data` to `path` so that `path` holds either its old content or all of `data`."""
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(root: Path, names: list[str]) -> list[str]:
    """SHA-256 of each `root/name`, several files at once (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return list(pool.map(lambda name: sha256_file(root / name), names))


def write_manifest(root: Path) -> None:
    """`root/checksums.sha256`: the SHA-256 of every other file under `root`, written atomically."""
    root = Path(root)
    names = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    )
    lines = [f"{digest}  {name}\n" for name, digest in zip(names, _hash_files(root, names))]
    atomic_write(root / MANIFEST, "".join(lines).encode())


def read_manifest(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if (
            not sep
            or not re.fullmatch(r"[0-9a-f]{64}", digest)
            or not name
            or name.startswith("/")
            or ".." in name.split("/")
        ):
            raise ValueError(f"line {number} is not '<sha256>  <file>'")
        entries[name] = digest
    return entries


def files_under(root: Path) -> tuple[list[str], str | None]:
    """Every file under `root` (relative POSIX paths, sorted) and, when there is one, why an entry is
    not a plain file of the directory: a symlink, FIFO, socket or device (`lstat` only: nothing is
    opened, so a FIFO cannot block the reader, and a link cannot point outside the directory)."""
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            mode = os.lstat(full).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file (a FIFO, socket or device)"
                return names, f"{full}: {kind}; a checkpoint holds regular files only (it was edited)"
            names.append(full.relative_to(root).as_posix())
    return sorted(names), None


def verify_manifest(root: Path, required: tuple[str, ...], complete: bool = True) -> str | None:
    """None when `root` has its manifest, the manifest lists every `required` file and every file it
    lists matches; with `complete`, also every file under `root` is listed and each is a regular file
    (a manifest that omits a file would let that file be damaged unnoticed). Otherwise why not (one
    line). Reads every file; deserialises nothing."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        return f"{root}: no {MANIFEST} (the write did not finish, or the file was deleted)"
    try:
        entries = read_manifest(root / MANIFEST)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{root / MANIFEST}: unreadable ({e}; truncated or corrupt)"
    for name in required:
        if name not in entries:
            return f"{root / MANIFEST}: does not list {name} (truncated or corrupt)"
    names = sorted(entries)
    if complete:
        try:
            present, problem = files_under(root)
        except OSError as e:
            return f"{root}: cannot be read ({e.strerror or e})"
        if problem is not None:
            return problem
        unlisted = sorted(set(present) - set(names) - {MANIFEST})
        if unlisted:
            return f"{root / unlisted[0]}: not listed in {MANIFEST} (the manifest lists every file of a checkpoint)"
    for name in names:
        if not (root / name).is_file() or (root / name).is_symlink():
            return f"{root / name}: missing or not a regular file (the checkpoint was damaged)"
    try:
        digests = _hash_files(root, names)
    except OSError as e:
        return f"{root}: cannot be read ({e.strerror or e})"
    for name, digest in zip(names, digests):
        if digest != entries[name]:
            return f"{root / name}: checksum mismatch (truncated or corrupt)"
    return None
