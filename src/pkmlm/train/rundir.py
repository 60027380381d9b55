"""The run directory: its lock, its saved config, and the check that a resume matches it."""

from __future__ import annotations

import errno
import subprocess
import warnings
from pathlib import Path
from typing import Any

from pkmlm.checkpoint import store
from pkmlm.checkpoint.store import latest_valid
from pkmlm.config import PROJECT_ROOT, Config
from pkmlm.errors import UserError

# Keys that may differ between a run's saved config and the config that resumes it (contract).
RESUME_MAY_DIFFER = (
    "train.stop_at_step",
    "train.max_steps",
    "resume",
    "logging.",
    "eval.interval",
    "eval.recall",
    "eval.recall_max_questions",
    "paths.",
)


def in_use_message(run_dir: Path) -> str:
    return (
        f"run directory {run_dir} is in use by another process (its .lock is held); "
        "wait for it to finish or choose another hydra.run.dir"
    )


def check_not_locked(run_dir: Path) -> None:
    """Refuse (UserError) a run directory whose `.lock` another process holds, writing nothing: the
    command line asks before Hydra writes a sweep's `multirun.yaml` (RunLock takes the lock later)."""
    import fcntl

    lock = run_dir / ".lock"
    if not lock.is_file():
        return
    with open(lock, "rb") as f:  # read-only: the file is neither created nor truncated
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(in_use_message(run_dir)) from None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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

    def __enter__(self) -> RunLock:
        try:
            self._lock.acquire(timeout=0)
        except self._timeout:
            raise UserError(in_use_message(self.run_dir)) from None
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


def schema_defaults() -> dict[str, Any]:
    """The typed schema's default for every dotted key (interpolations left unresolved)."""
    from omegaconf import OmegaConf

    return _flatten(OmegaConf.to_container(OmegaConf.structured(Config), resolve=False))


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ and are not allowed to differ on resume.

    A key the saved config lacks was added to the schema after that run was saved: it differs only
    when this run sets it away from the schema's default (which is what the older code ran with),
    so that adding a config key never strands the runs made before it.
    """
    a, b = _flatten(saved), _flatten(current)
    defaults = schema_defaults()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_DIFFER):
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            diffs.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return diffs


def resume_conflicts(saved: dict, saved_step: int, current: dict) -> list[str]:
    """Why a run saved with config `saved` at step `saved_step` may not resume under `current`:
    the keys of `config_differences`, plus `train.max_steps`, which the contract lets change only
    to extend a finished run (it sets the LR schedule, so changing it mid-run breaks exactness)."""
    diffs = config_differences(saved, current)
    before, now = saved.get("train", {}).get("max_steps"), current.get("train", {}).get("max_steps")
    if before is not None and now is not None and before != now:
        if saved_step < before:
            diffs.append(
                f"train.max_steps: {before!r} -> {now!r} (the run stopped at step {saved_step} of {before}; "
                "max_steps sets the LR schedule and may change only once the run has finished)"
            )
        elif now < saved_step:
            diffs.append(f"train.max_steps: {before!r} -> {now!r} (below the checkpoint's step {saved_step})")
    return diffs


def fresh_start_conflicts(run_dir: Path, current: dict) -> list[str]:
    """Why a fresh start in `run_dir` (no usable checkpoint there) would mix two runs: the keys of
    `config_differences` between the `config.yaml` another run left there and `current`. Empty when
    there is none, or when it is this run's own (a run killed before its first checkpoint)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # noqa: BLE001 - a config.yaml we cannot read is not a run's config
        return [f"its config.yaml is unreadable ({type(e).__name__})"]
    if not isinstance(saved, dict):
        return ["its config.yaml is not a mapping"]
    # config.yaml shows the vocabulary the run built; model.vocab_size=0 means "the tokenizer's".
    model = current.get("model")
    if isinstance(model, dict) and model.get("vocab_size") == 0 and isinstance(saved.get("model"), dict):
        current = {**current, "model": {**model, "vocab_size": saved["model"].get("vocab_size", 0)}}
    return config_differences(saved, current)


def resume_refusal(resumed: Path, diffs: list[str]) -> UserError:
    """The one line refusing to resume checkpoint `resumed` under another config (`resume_conflicts`)."""
    return UserError(
        f"cannot resume from {resumed}: the run was made with another config ({'; '.join(diffs[:3])}"
        f"{'; ...' if len(diffs) > 3 else ''}); use a new run directory or resume=never"
    )


def fresh_start_refusal(run_dir: Path, diffs: list[str]) -> UserError:
    """The one line refusing a fresh start in a directory another run left (`fresh_start_conflicts`)."""
    return UserError(
        f"run directory {run_dir} holds a run made with another config ({'; '.join(diffs[:3])}"
        f"{'; ...' if len(diffs) > 3 else ''}) and no checkpoint of it; use a new run directory, "
        "or resume=never to start over in this one"
    )


def _newest_listed(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint `store.resolve` would try first for `resume` (auto or a path), unverified."""
    if resume == "auto":
        found = store.list_checkpoints(Path(run_dir) / "checkpoints")
    else:
        path = Path(resume).expanduser()
        found = [path] if store.is_checkpoint(path) else store.list_checkpoints(path / "checkpoints")
        found = found or store.list_checkpoints(path)
    return found[-1] if found else None


def check_resume_early(resume: str, run_dir: Path, resolved: dict) -> None:
    """`setup`'s resume check, made by the command line before Hydra runs, so that a relaunched
    sweep refused for a resume conflict leaves its `multirun.yaml` as it was. Read-only and cheap:
    the newest checkpoint's meta.json (not verified: `setup` verifies the one it resumes, under the
    lock, and checks again), or with resume=auto and no checkpoint the config.yaml another run
    left. A meta.json that does not read is left to `setup`, which says why."""
    if resume == "never":
        return
    newest = _newest_listed(resume, run_dir)
    if newest is None:
        diffs = fresh_start_conflicts(run_dir, resolved) if resume == "auto" else []
        if diffs:
            raise fresh_start_refusal(run_dir, diffs)
        return
    try:
        meta = store.read_meta(newest)
    except store.NotACheckpointError:
        return
    diffs = resume_conflicts(meta["config"], meta["step"], resolved) if isinstance(meta.get("config"), dict) else []
    if diffs:
        raise resume_refusal(newest, diffs)


# errno values that mean "the file system is full or refuses to grow the file".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full_error(error: OSError, run_dir: Path) -> UserError | None:
    """A one-line user error for a write refused for lack of space, else None (a bug or I/O fault).
    It says whether a checkpoint is there to resume from."""
    if error.errno not in DISK_FULL_ERRNOS:
        return None
    where = f" writing {error.filename}" if error.filename else ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged ones are reported when the run resumes
        last = latest_valid(run_dir / "checkpoints")
    if last is not None:
        state = f"the last checkpoint {last} is intact: free space and resume with resume=auto"
    else:
        state = "no checkpoint has been written yet: free space and start the run again"
    return UserError(f"run directory {run_dir}: {error.strerror or error}{where}; {state}")


def check_input_paths(cfg: Any) -> None:
    """The paths a run reads, checked before any expensive work: `data.tokenizer` (when given) is a
    file, `resume` (when a path) is a checkpoint file or a directory, `eval.recall` (when given) a
    readable qa.jsonl. `data.files` is checked by
    `expand_files`; the run directory by the CLI before Hydra creates it."""
    tok = cfg.data.tokenizer
    if tok:
        path = Path(tok).expanduser()
        if not path.is_file():
            what = "a directory" if path.is_dir() else "no such file"
            raise UserError(
                f"data.tokenizer={tok!r}: {what} ({path.absolute()}); give a tokenizer.json path, or null to train one"
            )
    if cfg.eval.recall:  # every question read and checked now, not at the first evaluation
        from pkmlm.metrics.recall import read_questions

        read_questions(Path(cfg.eval.recall).expanduser())
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).expanduser().exists():
        raise UserError(
            f"resume={cfg.resume!r}: no such checkpoint file or run directory "
            f"({Path(cfg.resume).expanduser().absolute()}); use auto, never or an existing path"
        )


def check_output_dirs(run_dir: Path) -> None:
    """Where the run writes, checked before its first step: the run directory and its
    `checkpoints/` are directories (or can be made) this user may write, so that no step is trained
    only to be lost at the first save (a regular file named `checkpoints` used to be found there)."""
    from pkmlm.paths import dir_problem

    for path in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise UserError(
                f"{path} is a file, not a directory; the run writes its checkpoints there: move the file "
                "away or choose another hydra.run.dir"
            )
        problem = dir_problem(path)
        if problem is not None:
            raise UserError(f"run directory {path}: {problem}; choose another hydra.run.dir")


def code_version() -> dict[str, Any]:
    """The git commit of the project, whether the tree had uncommitted changes to tracked files
    (when known), and which (the first 50 paths: scripts/record_run.py accepts a run whose changes
    touch no training code)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.splitlines()
        paths = [line[3:] for line in changed if line.strip()]
        if not commit:
            return {"commit": None, "dirty": None}
        return {"commit": commit, "dirty": bool(paths), "dirty_paths": paths[:50]}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
