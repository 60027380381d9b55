"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

Trust model (docs/reliability.md): a run directory may come from anyone; its SHA-256 manifest
proves that the files are the ones written, not who wrote them. So nothing read from a checkpoint
may execute code, whatever its checksums say:
- `.metadata` is a pickle (DCP's index of the tensors). It is read by `RestrictedUnpickler`, which
  resolves only the DCP metadata classes, `torch.Size`, torch dtypes and layouts and `pathlib`
  paths (the allow-list `_ALLOWED`); any other global (`os.system`, `builtins.eval`, ...) refuses
  the file with `UnsafeCheckpointError` before anything is called.
- tensor data (`__<rank>_0.distcp`) is read by DCP with `torch.load(weights_only=True)`; the
  non-tensor values DCP stores beside them (optimizer hyper-parameters) are loaded here with
  `weights_only=True` too, where DCP's default planner uses `weights_only=False`.
- everything else in a checkpoint is JSON.

This module imports torch.distributed.checkpoint (and with it DTensor: ~1 s of a CLI's start-up), so
`pkmlm.checkpoint.store` imports it where it reads a checkpoint, not at its own import: a CLI that
exits on a bad value, or never touches a checkpoint, does not pay for it.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from pkmlm.errors import NotACheckpointError, UnsafeCheckpointError  # noqa: F401  (raised and re-exported here)

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
_DTYPES = {
    str(getattr(torch, name)).split(".", 1)[1]
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype)
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: the allow-listed globals and torch dtypes, nothing else."""

    def __init__(self, file, name: str):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.name}: refused to load: it names {module}.{name}, which is not part of a checkpoint "
            "(a crafted file can run code when unpickled); delete it or get the run from a trusted source"
        )


def load_metadata(path: str, name: str) -> Metadata:
    """DCP's `.metadata` file at `path`, through the restricted unpickler."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        metadata = RestrictedUnpickler(io.BytesIO(data), name).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means: not DCP metadata
        raise NotACheckpointError(
            f"{name}: not a checkpoint index ({type(e).__name__}); the checkpoint is not one pkmlm wrote"
        ) from None
    if not isinstance(metadata, Metadata):
        raise NotACheckpointError(
            f"{name}: not a checkpoint index (a {type(metadata).__name__}); the checkpoint is not one pkmlm wrote"
        )
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read through `RestrictedUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        metadata = load_metadata(str(path), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _load_bytes_safely(read_item: ReadItem, value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but plain values and tensors
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"names {found.group(1)}" if found else "holds a pickled object"
        raise UnsafeCheckpointError(
            f"entry {read_item.dest_index.fqn!r} {what}, which is not part of a checkpoint "
            "(a crafted file can run code when unpickled); delete it or get the run from "
            "a trusted source"
        ) from None


def _put(planner: DefaultLoadPlanner, read_item: ReadItem, value: io.BytesIO) -> None:
    """`DefaultLoadPlanner.load_bytes` with the value read by `torch.load(weights_only=True)`."""
    obj = _load_bytes_safely(read_item, value)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with its non-tensor values read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _put(self, read_item, value)


class SafeWholeLoadPlanner(_EmptyStateDictLoadPlanner):
    """Reads a whole checkpoint into an empty dict (one process), values as `SafeLoadPlanner`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _put(self, read_item, value)
