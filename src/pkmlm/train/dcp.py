"""Distributed checkpoints (`torch.distributed.checkpoint`): every rank writes its own part, and
any number of ranks can read them back.

Format (`checkpoint.format`): `auto` writes this format when more than one process runs or the run
has more than one data shard (a run started on several processes keeps it when resumed on one),
and the single-process `torch.save` file (`pkmlm.train.checkpoint`) otherwise; `dcp` always
writes this one, `torch` always the file (one process only). Resuming reads either, the newest
step first.

A checkpoint is the directory `checkpoints/step_XXXXXXXX.dcp/`:

    .metadata, __<rank>_0.distcp   model and optimizer state (DCP: each tensor stored once, with its
                                   global shape, so it loads on any number of ranks: a table
                                   sharded over 2 ranks loads whole into one process and back)
    data/shard_XXXXX.json          the data pipeline of each data shard (plain JSON), written by
                                   the rank that runs the shard
    rng/rank_XXXXX.pt              each rank's RNG states (restored when the rank count is unchanged)
    meta.pt                        step, tokens, config, model config, tokenizer, code version,
                                   world size, data shards; written by rank 0 once every rank is done
    checksums.sha256               the SHA-256 of every other file, as `sha256sum` prints it (so
                                   `cd step_XXXXXXXX.dcp && sha256sum -c checksums.sha256` checks it
                                   by hand); written last, by rank 0, atomically

It is written under `.step_XXXXXXXX.dcp.tmp/` and renamed into place after `checksums.sha256`, so
a directory with the final name is complete. Loading (resume, `pkmlm-eval`, `pkmlm.load_run`)
verifies every file against the manifest first: a directory without it (a write that did not
finish), with a file missing, truncated or bit-flipped, is skipped by `resume=auto` with a
warning (`skipping unusable checkpoint ...: checksum mismatch (truncated or corrupt)`), as a
damaged `.pt` file is; when none verifies and one of them was complete once (it has its
manifest), `resume=auto` refuses rather than start over. As with the single-process files, a
valid checkpoint of a step is never replaced, saving step s removes checkpoints of later steps
(another timeline), and only the newest `checkpoint.keep_last` are kept (a directory is renamed to
`.step_XXXXXXXX.dcp.del` before it is deleted, so a kill mid-deletion never leaves a half-deleted
directory under a checkpoint's name). The run directory must be on a file system that every node
sees.

Model and optimizer state go through `torch.distributed.checkpoint.state_dict`
(`get_state_dict` / `set_state_dict`), which names parameters the same way with and without DDP or
FSDP2 wrappers and keeps DTensors sharded, so save and load never gather a whole model on a rank.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import torch

from pkmlm.errors import ConfigError, UserError
from pkmlm.train.checkpoint import (CheckpointWriteError, atomic_write, checkpoint_step, damaged_checkpoints_error,
                                    fsync_dir, latest_valid_checkpoint, list_checkpoints, prune_checkpoints,
                                    resolve_resume, rng_state, set_rng_state)
from pkmlm.train.data_shards import DataShards, load_shard_states, shard_states
from pkmlm.train.distributed import DistInfo, run_on_main

T = TypeVar("T")
FORMATS = ("auto", "torch", "dcp")
META = "meta.pt"
MANIFEST = "checksums.sha256"
_NAME = re.compile(r"^step_(\d{8})\.dcp$")
# What the single-process payload holds that this format stores per rank or in DCP instead.
_PER_RANK_KEYS = ("model", "optimizer", "data", "rng")


def checkpoint_format(configured: str, info: DistInfo, data_shards: int) -> str:
    """`torch` or `dcp` for `checkpoint.format` (see the module docstring)."""
    if configured not in FORMATS:
        raise ConfigError("checkpoint.format", configured, f"one of {'|'.join(FORMATS)}")
    if configured == "torch" and info.distributed:
        raise ConfigError("checkpoint.format", configured,
                          f"a torch.save file holds one process's state, and {info.world_size} processes run; "
                          "use auto or dcp")
    if configured == "auto":
        return "dcp" if info.distributed or data_shards > 1 else "torch"
    return configured


def dcp_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.dcp"


def list_dcp_checkpoints(directory: Path) -> list[Path]:
    """`step_XXXXXXXX.dcp` directories in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p.is_dir())


def is_dcp_checkpoint(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (_NAME.match(path.name) is not None or (path / META).exists())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(root: Path, names: List[str]) -> List[str]:
    """SHA-256 of each `root/name`, several files at once (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
        return list(pool.map(lambda name: _sha256_file(root / name), names))


def write_manifest(root: Path) -> None:
    """`root/checksums.sha256`: the SHA-256 of every other file under `root`, written atomically."""
    root = Path(root)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    lines = [f"{digest}  {name}\n" for name, digest in zip(names, _hash_files(root, names))]
    atomic_write(root / MANIFEST, "".join(lines).encode())


def _read_manifest(path: Path) -> Dict[str, str]:
    entries: Dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest) or not name or name.startswith("/") \
                or ".." in name.split("/"):
            raise ValueError(f"line {number} is not '<sha256>  <file>'")
        entries[name] = digest
    return entries


def verify_dcp(path: Path) -> Optional[str]:
    """None when the directory is a complete checkpoint whose every file matches its manifest;
    otherwise why not (one line). Reads every file; deserializes nothing."""
    path = Path(path)
    if not path.is_dir():
        return f"{path}: no such checkpoint directory"
    if not (path / ".metadata").is_file():
        return f"{path}: no .metadata (the distributed write did not finish)"
    if not (path / META).is_file():
        return f"{path}: no {META} (the write did not finish)"
    if not (path / MANIFEST).is_file():
        return f"{path}: no {MANIFEST} (the write did not finish)"
    try:
        entries = _read_manifest(path / MANIFEST)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{path / MANIFEST}: unreadable ({e}; truncated or corrupt)"
    for name in (".metadata", META):
        if name not in entries:
            return f"{path / MANIFEST}: does not list {name} (truncated or corrupt)"
    names = sorted(entries)
    for name in names:
        if not (path / name).is_file():
            return f"{path / name}: missing (the checkpoint was damaged)"
    try:
        digests = _hash_files(path, names)
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or e})"
    for name, digest in zip(names, digests):
        if digest != entries[name]:
            return f"{path / name}: checksum mismatch (truncated or corrupt)"
    return None


def load_meta(path: Path) -> Dict[str, Any]:
    """The checkpoint's common state (everything but model, optimizer, data and RNG)."""
    # weights_only=False: plain containers written by us (config, tokenizer text, code version).
    meta = torch.load(Path(path) / META, map_location="cpu", weights_only=False)
    meta["format"] = "dcp"
    return meta


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save and load that it assumes a single process: we do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def latest_valid_dcp(directory: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    for path in reversed(list_dcp_checkpoints(directory)):
        reason = verify_dcp(path)
        if reason is None:
            try:
                return path, load_meta(path)
            except Exception as e:  # unreadable meta: not a usable checkpoint
                reason = f"{path / META}: {type(e).__name__}: {e}"
        warnings.warn(f"skipping unusable checkpoint {path}: {reason}", stacklevel=2)
    return None


def resolve_resume_any(resume: str, run_dir: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """`pkmlm.train.checkpoint.resolve_resume` extended to DCP directories: `auto` and a run
    directory take the newest valid checkpoint of either format; a `.dcp` directory is loaded as
    such. Returns `(path, state)`; a DCP state holds the common state and `format: dcp`."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if is_dcp_checkpoint(path):
            reason = verify_dcp(path)
            if reason is not None:
                raise UserError(f"resume={resume!r}: {reason}; give another checkpoint or resume=auto")
            return path, load_meta(path)
        directories = [path / "checkpoints", path] if path.is_dir() else []
    else:
        directories = [run_dir / "checkpoints"]
    found = None
    for directory in directories:
        found = latest_valid_dcp(directory)
        if found is not None:
            break
    if found is None:
        # No distributed checkpoint verifies: the single-process rules (and their refusal when every
        # .pt file was damaged after it was complete) decide, unless a DCP directory was complete once
        # (it has its manifest) and was damaged since: then, as for a damaged .pt, refuse to start over.
        single = resolve_resume(resume, run_dir)
        damaged = [p.name for d in directories for p in list_dcp_checkpoints(d) if (p / MANIFEST).is_file()]
        if single is None and resume == "auto" and damaged:
            raise damaged_checkpoints_error(directories[0], damaged)
        return single
    # Both formats in one directory (a run that changed checkpoint.format): the newer step wins.
    newer_files = [p for p in list_checkpoints(found[0].parent) if checkpoint_step(p) > _step_of(found[0])]
    if newer_files:
        single = resolve_resume(resume, run_dir)
        if single is not None and single[1]["step"] > found[1]["step"]:
            return single
    return found


def resolve_resume_shared(resume: str, run_dir: Path, info: DistInfo) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """`resolve_resume_any` decided by rank 0 (every rank then reads the same checkpoint). Several
    processes resume only from a distributed checkpoint."""
    if not info.distributed:
        return resolve_resume_any(resume, run_dir)
    found = run_on_main(lambda: (lambda r: None if r is None else str(r[0]))(resolve_resume_any(resume, run_dir)),
                        info)
    if found is None:
        return None
    path = Path(found)
    if not is_dcp_checkpoint(path):
        raise UserError(
            f"resume: {path} was written by one process (torch.save) and {info.world_size} processes run; resume "
            "it with one process (it then keeps writing that format), or start runs that will change their "
            "process count with checkpoint.format=dcp")
    return path, load_meta(path)


def newest_checkpoint(path: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """For reading a run (`pkmlm.load_run`, `pkmlm-eval`): `path` itself when it is a DCP
    directory, else the newest valid checkpoint of either format under `path/checkpoints` (None
    when there is none). A DCP state holds the common state and `format: dcp`."""
    path = Path(path)
    if is_dcp_checkpoint(path):
        reason = verify_dcp(path)
        if reason is not None:
            raise UserError(f"checkpoint={str(path)!r}: {reason}")
        return path, load_meta(path)
    found = latest_valid_dcp(path / "checkpoints")
    if found is None or any(checkpoint_step(p) > _step_of(found[0]) for p in list_checkpoints(path / "checkpoints")):
        single = latest_valid_checkpoint(path / "checkpoints")
        if single is not None and (found is None or single[1]["step"] > found[1]["step"]):
            return single
    return found


def load_dcp_model(path: Path, model: torch.nn.Module) -> None:
    """The model state alone from a DCP checkpoint, into a plain (unsharded) model in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_sd = get_model_state_dict(model)
    with _quiet_single_process():
        dcp.load({"model": model_sd}, checkpoint_id=str(path), no_dist=True)
    set_model_state_dict(model, model_sd)


def _data_shards_of(batches: Any) -> int:
    return batches.n_shards if isinstance(batches, DataShards) else 1


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory: renamed away first (atomic), so a kill mid-deletion leaves
    `.step_XXXXXXXX.dcp.del`, removed at the next save, never a half-deleted checkpoint."""
    doomed = path.with_name(f".{path.name}.del")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.replace(path, doomed)
    except OSError:  # e.g. a leftover `.del` that could not be removed: delete in place
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _refusals_as_user_errors(fn: Callable[[], T], final: Path) -> Callable[[], T]:
    """`fn` (rank 0's part of a save) with an OS refusal (full disk, quota, size limit, I/O) turned
    into a one-line `CheckpointWriteError`, which `run_on_main` raises on every rank (a bare OSError
    on rank 0 would leave the others waiting for it)."""
    def guarded() -> T:
        try:
            return fn()
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoint {final}: {e.strerror or e} (errno {errno.errorcode.get(e.errno, e.errno)}"
                f"{', ' + str(e.filename) if e.filename else ''}); the earlier checkpoints under {final.parent} are "
                "untouched; free space (or fix the file system) there and resume with resume=auto") from None
    return guarded


def save_dcp(directory: Path, step: int, payload: Dict[str, Any], *, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, batches: Any, info: DistInfo, keep_last: int) -> Path:
    """Write the checkpoint of `step` from every rank (a collective: all ranks call it).

    `payload` is the loop's single-process checkpoint dict; its model, optimizer, data and RNG
    entries are replaced by the live `model` (unwrapped), `optimizer` and `batches`, saved per rank.
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final = dcp_path(directory, step)
    tmp = directory / f".{final.name}.tmp"

    def prepare() -> bool:
        directory.mkdir(parents=True, exist_ok=True)
        for pattern in (".step_*.dcp.tmp", ".step_*.dcp.del"):  # left by a killed writer (the lock is ours)
            for stale in directory.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        if verify_dcp(final) is None:
            return False  # never replace a valid checkpoint of this step
        (tmp / "data").mkdir(parents=True)
        (tmp / "rng").mkdir()
        return True

    if not run_on_main(_refusals_as_user_errors(prepare, final), info):
        return final
    for shard, state in shard_states(batches).items():
        atomic_write(tmp / "data" / f"shard_{shard:05d}.json", json.dumps(state).encode())
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    atomic_write(tmp / "rng" / f"rank_{info.rank:05d}.pt", buffer.getvalue())
    model_sd, optim_sd = _state_dicts(model, optimizer)
    # Collective; returns on every rank once rank 0 has written .metadata (all parts are on disk).
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not info.distributed)

    if info.distributed:  # every rank's files are on disk before rank 0 hashes them
        import torch.distributed as dist

        dist.barrier()

    def finish() -> None:
        meta = {k: v for k, v in payload.items() if k not in _PER_RANK_KEYS}
        meta.update(world_size=info.world_size, data_shards=_data_shards_of(batches))
        buffer = io.BytesIO()
        torch.save(meta, buffer)
        atomic_write(tmp / META, buffer.getvalue())
        write_manifest(tmp)  # last: a directory with its manifest is complete
        if final.exists():  # an incomplete or damaged directory of this step
            _remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(directory)
        prune_checkpoints(list_dcp_checkpoints(directory), step, keep_last, _step_of, _remove_dir)

    # Every rank waits for it: the checkpoint exists when save_dcp returns.
    run_on_main(_refusals_as_user_errors(finish, final), info)
    return final


def load_dcp(path: Path, meta: Dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             batches: Any, info: DistInfo) -> None:
    """Restore model, optimizer, this rank's data shards and (same rank count) its RNG from `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    with _quiet_single_process():
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), no_dist=not info.distributed)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    mine = sorted(batches.shards) if isinstance(batches, DataShards) else [0]
    states = {}
    for shard in mine:
        file = path / "data" / f"shard_{shard:05d}.json"
        if not file.is_file():
            raise UserError(f"resume: {file} is missing; the checkpoint {path} is incomplete, give another one")
        states[shard] = json.loads(file.read_text())
    load_shard_states(batches, states)
    rng_file = path / "rng" / f"rank_{info.rank:05d}.pt"
    if meta.get("world_size") == info.world_size and rng_file.is_file():
        # Dropout masks continue exactly; with another rank count each rank keeps its fresh seed.
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
