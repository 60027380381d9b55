"""The checkpoint store: one format for one and many processes (torch.distributed.checkpoint).

A checkpoint is the directory `checkpoints/step_XXXXXXXX.dcp/`:

    .metadata, __<rank>_0.distcp   tensors (model and optimizer state; DCP stores each tensor once,
                                   with its global shape, so it loads on any number of ranks: a
                                   table sharded over 2 ranks loads whole into one process)
    meta.json                      the run's common state (step, tokens, clocks, config, model
                                   config, tokenizer, code version, world size, data shards, wandb
                                   run id, the names of the saved pieces: `states`), written by
                                   rank 0 once every rank is done
    data/shard_XXXXX.json          each data shard's pipeline state, written by the rank running it
    rng/rank_XXXXX.json            each rank's RNG states
    checksums.sha256               the SHA-256 of every other file (`sha256sum -c` checks it by hand),
                                   written last, by rank 0

Everything but the tensors is JSON, and the tensors are read without running code
(`pkmlm.checkpoint.safe`). The directory is written under `.step_XXXXXXXX.dcp.tmp/` and renamed
into place after its manifest, so a directory with the final name is complete.

Rules that keep the directory one consistent timeline (docs/reliability.md):
- loading verifies every file against the manifest first (which must list every file of the
  directory, each a regular file), then the schema of meta.json and of DCP's index (storage entries
  confined to the listed files); `resume=auto` skips a damaged checkpoint with a warning and takes
  the previous one; when none verifies it refuses rather than start over (a directory gets a
  checkpoint's name only after its manifest: each was complete once);
- only a checkpoint that verifies is ever deleted: one that does not is set aside as
  `step_XXXXXXXX.dcp.unverified` (`set_aside`), out of the timeline, for the user to inspect;
- a valid checkpoint of a step is never replaced (the state at a step is reproducible from it);
- saving step s removes checkpoints of later steps (another timeline: they were unusable, or the
  run was rewound with `resume=PATH`), then all but the newest `keep_last`; a directory is renamed
  to `.step_XXXXXXXX.dcp.del` before it is deleted, so a kill mid-deletion never leaves a
  half-deleted directory under a checkpoint's name;
- a failed write (full disk, quota, file-size limit, I/O error) raises `CheckpointWriteError`, one
  line naming the file, the OS error and whether an earlier checkpoint is intact.
Single-file `step_XXXXXXXX.pt` checkpoints of earlier pkmlm versions are refused with one line
(unpickling them could run code). The run directory must be on a file system every node sees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pkmlm.checkpoint.files import (
    MANIFEST,
    atomic_write,
    fsync_dir,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from pkmlm.errors import NotACheckpointError, UnsafeCheckpointError, UserError
from pkmlm.parallel.agree import run_on_main
from pkmlm.parallel.env import DistInfo

T = TypeVar("T")
META = "meta.json"
FORMAT_VERSION = 2  # 1: the single-file .pt checkpoints, no longer read
META_KEYS = ("format_version", "step", "tokens")  # what makes meta.json a pkmlm checkpoint's
_NAME = re.compile(r"^step_(\d{8})\.dcp$")
_OLD_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the OS refused: full disk, quota, size limit, I/O)."""


# --- names -----------------------------------------------------------------------------------------


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.dcp"


def step_of(path: Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_XXXXXXXX.dcp)")
    return int(match.group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """`step_XXXXXXXX.dcp` directories in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name) and p.is_dir())


def is_checkpoint(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (_NAME.match(path.name) is not None or (path / ".metadata").exists())


def old_format_error(path: Path) -> UserError:
    return UserError(
        f"{path}: a single-file checkpoint of an earlier pkmlm (.pt), which this version does not load "
        "(unpickling it could run code); continue that run with the pkmlm that wrote it, or start a new run"
    )


# --- verifying and reading -------------------------------------------------------------------------


def verify(path: Path) -> str | None:
    """None when `path` is a complete checkpoint whose every file matches its manifest; otherwise
    why not (one line). Reads every file; deserialises nothing."""
    path = Path(path)
    if not path.is_dir():
        return f"{path}: no such checkpoint directory"
    if not (path / ".metadata").is_file():
        return f"{path}: no .metadata (the distributed write did not finish)"
    if not (path / META).is_file():
        return f"{path}: no {META} (the write did not finish)"
    return verify_manifest(path, (".metadata", META))


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's common state (`meta.json`); `NotACheckpointError` when it is not one a
    pkmlm checkpoint holds (valid JSON of the wrong shape included)."""
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotACheckpointError(f"{file}: not a pkmlm checkpoint's {META} ({type(e).__name__})") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise NotACheckpointError(f"{file}: not a pkmlm checkpoint's {META} (no {', '.join(missing)})")
    if meta["format_version"] != FORMAT_VERSION:
        raise NotACheckpointError(
            f"{file}: checkpoint format {meta['format_version']!r}, this pkmlm reads {FORMAT_VERSION}"
        )
    problem = meta_problem(meta)
    if problem is not None:
        raise NotACheckpointError(f"{file}: {problem}; the file was edited or is not a pkmlm checkpoint's")
    return meta


# meta.json's fields and the JSON types a pkmlm checkpoint gives them (the schema check of meta.json;
# a field may be absent: checkpoints of tests and conversions hold only what they need).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "tokens": (int,),
    "config": (dict,),
    "model_config": (dict,),
    "tokenizer": (str,),
    "world_size": (int,),
    "data_shards": (int,),
    "init_from": (str, type(None)),
    "stale_slots": (list,),  # checkpoints written before `states`: the layers whose staleness they hold
    "states": (list,),  # the Stateful pieces saved (pkmlm.checkpoint.states)
    "code_version": (dict,),
    "wandb_run_id": (str, type(None)),
}


def meta_problem(meta: dict[str, Any]) -> str | None:
    """Why `meta` is not a meta.json pkmlm writes (a field of the wrong type or range), or None."""
    for key, types in _META_TYPES.items():
        if key not in meta:
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, types):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"field {key!r} is {type(value).__name__} {str(value)[:40]!r}, expected {allowed}"
        if isinstance(value, int) and value < (1 if key in ("world_size", "data_shards") else 0):
            return f"field {key!r} is {value}, out of range"
    if "stale_slots" in meta and not all(isinstance(i, int) and not isinstance(i, bool) for i in meta["stale_slots"]):
        return "field 'stale_slots' must list layer numbers"
    if "states" in meta and not all(isinstance(name, str) for name in meta["states"]):
        return "field 'states' must list the names of saved pieces"
    return None


def index_problem(path: Path, metadata: Any) -> str | None:
    """Why DCP's index of checkpoint `path` cannot be followed safely, or None: every storage entry
    must name a file of the checkpoint that its manifest lists (no absolute path, no `..`, no FIFO
    or file outside it: opening one would block or read another file), and lie within that file."""
    try:
        listed = set(read_manifest(path / MANIFEST))
    except (OSError, UnicodeDecodeError, ValueError):
        listed = set()
    sizes: dict[str, int] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        relative = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(relative, str) or relative.startswith("/") or ".." in relative.split("/"):
            return f"{path / '.metadata'}: a storage entry points at {str(relative)[:80]!r}, outside the checkpoint"
        if relative not in listed:
            return f"{path / '.metadata'}: a storage entry names {relative!r}, which {MANIFEST} does not list"
        if relative not in sizes:
            sizes[relative] = (path / relative).stat().st_size
        if not all(isinstance(v, int) and v >= 0 for v in (offset, length)) or offset + length > sizes[relative]:
            return (
                f"{path / '.metadata'}: the entry {getattr(index, 'fqn', '?')!r} lies outside {relative} "
                f"({sizes[relative]} bytes)"
            )
    return None


def read_json(path: Path, relative: str) -> Any:
    file = Path(path) / relative
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file} is missing; the checkpoint {path} is incomplete, give another one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotACheckpointError(f"{file}: not JSON ({type(e).__name__}); the checkpoint is damaged") from None


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save and load that it assumes a single process: we do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


@contextlib.contextmanager
def _refusing_unsafe_content(path: Path) -> Iterator[None]:
    """A DCP read that met pickled objects (refused by `weights_only=True` or the restricted
    unpickler) becomes one `UnsafeCheckpointError` naming the checkpoint; DCP wraps the errors of
    its readers in a `CheckpointException` (a BaseException), unwrapped here."""
    import pickle

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        causes = [exc for exc, _ in e.failures.values()]
        for exc in causes:
            if isinstance(exc, (UnsafeCheckpointError, pickle.UnpicklingError)):
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise UnsafeCheckpointError(f"{path}: refused to load: {first}") from None
        if causes and isinstance(causes[0], UserError):
            raise causes[0] from None
        raise
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refused to load: {str(e).strip().splitlines()[0][:300]}") from None


def template_problem(path: Path, tensors: dict[str, Any]) -> str | None:
    """The schema check of `.metadata` against the model: every tensor of the template `tensors`
    has an entry of the same (global) shape in the checkpoint's index, or why not (one line). From
    the index alone: nothing is read before it passes."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from pkmlm.checkpoint.safe import load_metadata

    file = Path(path) / ".metadata"
    entries = load_metadata(str(file), str(file)).state_dict_metadata
    flat, _ = flatten_state_dict(tensors)
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            continue
        entry = entries.get(key)
        if entry is None:
            return f"{file}: has no entry {key!r}, which the model needs (the index of another model, or edited)"
        if not isinstance(entry, TensorStorageMetadata):
            continue  # a value stored as bytes: read by torch.load(weights_only=True), which refuses objects
        if tuple(entry.size) != tuple(value.shape):
            size = tuple(entry.size)
            return (
                f"{file}: {key!r} has shape {size} in the index, the model {tuple(value.shape)} "
                "(another model's, or edited)"
            )
    return None


def load_tensors(path: Path, tensors: dict[str, Any], info: DistInfo = DistInfo()) -> None:
    """Fill the state dict `tensors` (templates: the live model's and optimizer's state dicts,
    DTensors sharded as this rank holds them) from the checkpoint, in place (a collective). The index
    is checked against the templates first (`template_problem`): one line, nothing read."""
    import torch.distributed.checkpoint as dcp

    from pkmlm.checkpoint.safe import SafeLoadPlanner, SafeReader

    problem = template_problem(path, tensors)
    if problem is not None:
        raise UserError(f"{path}: cannot be loaded into this model: {problem}")

    with _quiet_single_process(), _refusing_unsafe_content(path):
        dcp.load(tensors, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), no_dist=not info.distributed)


def read_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of the checkpoint, whole, as one nested dict (one process; for inspection,
    export and tests)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from pkmlm.checkpoint.safe import SafeReader, SafeWholeLoadPlanner

    state: dict[str, Any] = {}
    with _quiet_single_process(), _refusing_unsafe_content(path):
        _load_state_dict(state, storage_reader=SafeReader(str(path)), planner=SafeWholeLoadPlanner(), no_dist=True)
    return state


# --- finding a checkpoint --------------------------------------------------------------------------


def _usable(path: Path) -> str | None:
    """Why `path` cannot be loaded (None: it can): verified files, a pkmlm meta.json and DCP
    metadata. A file crafted to run code raises `UnsafeCheckpointError` instead: it is refused,
    never skipped."""
    reason = verify(path)
    if reason is None:
        from pkmlm.checkpoint.safe import load_metadata

        try:
            read_meta(path)
            reason = index_problem(path, load_metadata(str(path / ".metadata"), str(path / ".metadata")))
        except NotACheckpointError as e:
            reason = str(e)
    return reason


def latest_valid(directory: Path) -> Path | None:
    """The newest checkpoint in `directory` that verifies; newer unusable ones are skipped with a
    warning."""
    for path in reversed(list_checkpoints(directory)):
        reason = _usable(path)
        if reason is None:
            return path
        warnings.warn(f"skipping unusable checkpoint {path}: {reason}", stacklevel=2)
    return None


def _refuse_old_format(directory: Path) -> None:
    old = (
        sorted(p for p in Path(directory).glob("step_*.pt") if _OLD_NAME.match(p.name))
        if Path(directory).is_dir()
        else []
    )
    if old:
        raise old_format_error(old[-1])


def damaged_checkpoints_error(directory: Path, damaged: list[str], why: str = "") -> UserError:
    """`resume=auto` found no valid checkpoint, but the `damaged` ones were complete once (a
    checkpoint gets its name only once written whole, manifest included). Nothing is deleted."""
    one = len(damaged[-3:]) == 1
    return UserError(
        f"resume=auto: no checkpoint in {directory} verifies, though {', '.join(damaged[-3:])} "
        f"{'was' if one else 'were'} written completely and {'has' if one else 'have'} been damaged since"
        f"{f' ({why})' if why else ''}; nothing was deleted: restore it from a copy, give another with "
        "resume=PATH, or move checkpoints/ away and start over with resume=never"
    )


def _given_checkpoint(path: Path, what: str) -> Path:
    """`path`, a checkpoint directory given by the user, verified (one-line refusal otherwise)."""
    if _OLD_NAME.match(path.name) and path.is_file():
        raise old_format_error(path)
    reason = _usable(path)
    if reason is not None:
        raise UserError(f"{what}: {reason}; give another checkpoint")
    return path


def resolve(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from. `never`: None. `auto`: the newest valid one in
    `run_dir/checkpoints` (None when there is none: a fresh start). A path: that checkpoint, or
    the newest valid one of that run directory."""
    if resume == "never":
        return None
    if resume == "auto":
        directory = Path(run_dir) / "checkpoints"
        found = latest_valid(directory)
        if found is None:
            _refuse_old_format(directory)
            # None valid: a fresh start, unless there is one. A directory has a checkpoint's name only
            # once it was written whole (its manifest last, then the rename), so each was complete
            # once and was damaged since (a deleted manifest included): starting over would throw that
            # training away, and its first save would prune them. Refuse, deleting nothing.
            damaged = list_checkpoints(directory)
            if damaged:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    why = _usable(damaged[-1]) or ""
                raise damaged_checkpoints_error(directory, [p.name for p in damaged], why)
        return found
    path = Path(resume).expanduser()
    if is_checkpoint(path) or path.is_file():
        return _given_checkpoint(path, f"resume={resume!r}")
    if path.is_dir():
        found = latest_valid(path / "checkpoints") or latest_valid(path)
        if found is None:
            _refuse_old_format(path / "checkpoints")
            raise UserError(f"resume={resume!r}: no valid checkpoint in that directory")
        return found
    raise UserError(f"resume={resume!r}: no such checkpoint or run directory")


def resolve_shared(resume: str, run_dir: Path, info: DistInfo) -> Path | None:
    """`resolve` decided by rank 0 (its warnings printed once); every rank reads that checkpoint."""
    found = run_on_main(lambda: (lambda p: None if p is None else str(p))(resolve(resume, run_dir)), info)
    return None if found is None else Path(found)


def find_for_reading(path: Path, key: str = "checkpoint") -> Path:
    """For `pkmlm.load_run` and `pkmlm-eval`: `path` itself when it is a checkpoint, else the newest
    valid checkpoint of run directory `path`; one-line `UserError` when there is none."""
    path = Path(path).expanduser()
    if is_checkpoint(path) or path.is_file():
        return _given_checkpoint(path, f"{key}={str(path)!r}")
    if not path.is_dir():
        raise UserError(f"{key}={str(path)!r}: no such run directory or checkpoint")
    found = latest_valid(path / "checkpoints")
    if found is None:
        _refuse_old_format(path / "checkpoints")
        raise UserError(f"{key}={str(path)!r}: no valid checkpoint under {path / 'checkpoints'}")
    return found


# --- writing ---------------------------------------------------------------------------------------


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


def set_aside(path: Path, why: str) -> Path:
    """Move checkpoint `path`, which does not verify, out of the timeline without deleting it:
    renamed to `step_XXXXXXXX.dcp.unverified[.N]` beside it (never read as a checkpoint), with a
    warning saying where it is. Only what verifies is ever deleted (docs/reliability.md)."""
    target = path.with_name(f"{path.name}.unverified")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.unverified.{n}"), n + 1
    os.replace(path, target)
    warnings.warn(
        f"checkpoint {path.name} does not verify ({why}): set aside as {target.name}, not deleted "
        "(only verified checkpoints are deleted); inspect or restore it, or delete it by hand",
        stacklevel=4,
    )
    return target


def _unverified(path: Path) -> str | None:
    """Why checkpoint `path` may not be deleted (None: it verifies and is a checkpoint pkmlm reads)."""
    try:
        return _usable(path)
    except UserError as e:  # a crafted file: kept for the user to look at, never deleted by us
        return str(e)


def _remove_verified(path: Path) -> None:
    """Delete checkpoint `path` if it verifies; set it aside (kept) if it does not."""
    reason = _unverified(path)
    if reason is None:
        _remove_dir(path)
    else:
        set_aside(path, reason)


def prune(directory: Path, step: int, keep_last: int) -> None:
    """The retention rule, after writing `step`: checkpoints newer than `step` go (the run continued
    from an older one), then all but the last `keep_last`. Only checkpoints that verify are deleted;
    one that does not is set aside under another name (`set_aside`), never deleted."""
    kept = []
    for path in list_checkpoints(directory):
        if step_of(path) > step:
            reason = _unverified(path)
            if reason is not None:
                set_aside(path, reason)
                continue
            warnings.warn(
                f"removing checkpoint {path.name}: newer than step {step}, which this run continued "
                "from (the run was rewound with resume=PATH)",
                stacklevel=3,
            )
            _remove_dir(path)
        else:
            kept.append(path)
    for old in kept[:-keep_last]:
        _remove_verified(old)


def _write_refused(final: Path, e: OSError) -> CheckpointWriteError:
    previous = [p for p in list_checkpoints(final.parent) if step_of(p) < step_of(final) and verify(p) is None]
    intact = (
        f"the previous checkpoint {previous[-1].name} is intact" if previous else "there is no earlier valid checkpoint"
    )
    return CheckpointWriteError(
        f"cannot write checkpoint {final}: {e.strerror or e} (errno {errno.errorcode.get(e.errno, e.errno)}"
        f"{', ' + str(e.filename) if e.filename else ''}); {intact}; free space (or fix the file system) "
        f"under {final.parent} and resume with resume=auto"
    )


def _refusals_as_user_errors(fn: Callable[[], T], final: Path) -> Callable[[], T]:
    """`fn` (rank 0's part of a save) with an OS refusal turned into a one-line
    `CheckpointWriteError`, which `run_on_main` raises on every rank (a bare OSError on rank 0 would
    leave the others waiting for it)."""

    def guarded() -> T:
        try:
            return fn()
        except OSError as e:
            raise _write_refused(final, e) from None

    return guarded


@contextlib.contextmanager
def _os_errors_unwrapped(tmp: Path) -> Iterator[None]:
    """DCP reports a writer's failure inside a `CheckpointException`: raise it as the OSError it is.
    torch's tensor writer turns a refused `write` into a RuntimeError of its own ("unexpected pos",
    "file write failed"); the cause is then read off the file system: the file-size limit reached
    (EFBIG), no space left (ENOSPC), else an I/O error."""
    import resource

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        for exc, _ in e.failures.values():
            if isinstance(exc, OSError):
                raise exc from None
            if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "write failed" in str(exc)):
                files = sorted(tmp.glob("*.distcp"), key=lambda p: p.stat().st_size)
                limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
                if files and limit != resource.RLIM_INFINITY and files[-1].stat().st_size >= limit:
                    code = errno.EFBIG
                elif shutil.disk_usage(tmp).free < 1 << 20:
                    code = errno.ENOSPC
                else:
                    code = errno.EIO
                raise OSError(code, os.strerror(code), str(files[-1]) if files else str(tmp)) from None
        raise


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False).encode()


def save(
    directory: Path,
    step: int,
    *,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    rank_files: dict[str, Any],
    info: DistInfo = DistInfo(),
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of `step` (a collective: every rank calls it). `tensors`: the state dict
    saved by DCP (same keys on every rank); `meta`: rank 0's JSON common state (`step` and `tokens`
    among it); `rank_files`: this rank's JSON files by relative path (`data/shard_00001.json`).
    Then prunes per the retention rule. Returns the checkpoint's path."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    final = checkpoint_path(directory, step)
    tmp = directory / f".{final.name}.tmp"

    def prepare() -> bool:
        directory.mkdir(parents=True, exist_ok=True)
        for pattern in (".step_*.dcp.tmp", ".step_*.dcp.del"):  # left by a killed writer (the lock is ours)
            for stale in directory.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        if verify(final) is None:
            return False  # never replace a valid checkpoint of this step
        tmp.mkdir(parents=True)
        return True

    if not run_on_main(_refusals_as_user_errors(prepare, final), info):
        return final
    try:
        for relative, value in rank_files.items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(tmp / relative, _json_bytes(value))
        with _quiet_single_process(), _os_errors_unwrapped(tmp):  # collective; returns once .metadata is written
            dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not info.distributed)
    except OSError as e:
        if info.distributed:
            raise  # a rank's own disk refused: the job cannot agree on it, stop with the OS error
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_refused(final, e) from None
    if info.distributed:  # every rank's files are on disk before rank 0 hashes them
        import torch.distributed as dist

        dist.barrier()

    def finish() -> None:
        try:
            atomic_write(tmp / META, _json_bytes({**meta, "format_version": FORMAT_VERSION, "step": step}))
            write_manifest(tmp)  # last: a directory with its manifest is complete
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written directory stays behind
            raise
        if final.exists():  # a damaged directory of this step (it did not verify): kept, under another name
            set_aside(final, verify(final) or "damaged")
        os.replace(tmp, final)
        fsync_dir(directory)
        prune(directory, step, keep_last)

    run_on_main(_refusals_as_user_errors(finish, final), info)  # every rank waits: it exists on return
    return final


def write(directory: Path, step: int, state: dict[str, Any], keep_last: int = 2) -> Path:
    """`save` from one process of a state as `read` returns it (tests, conversions)."""
    files = {k: v for k, v in state.items() if k.endswith(".json") and k != META}
    tensors = {k: v for k, v in state.items() if k not in files and k != "meta"}
    return save(directory, step, tensors=tensors, meta=state["meta"], rank_files=files, keep_last=keep_last)


def read(path: Path) -> dict[str, Any]:
    """A whole checkpoint in one process: `meta` (meta.json), every tensor entry by its DCP name
    (`model`, `optim`), and every other JSON file by its relative path (`data/shard_00000.json`)."""
    path = Path(path)
    reason = _usable(path)
    if reason is not None:
        raise UserError(reason)
    state: dict[str, Any] = {"meta": read_meta(path), **read_tensors(path)}
    for file in sorted(path.rglob("*.json")):
        relative = file.relative_to(path).as_posix()
        if relative != META:
            state[relative] = read_json(path, relative)
    return state
