"""What every Hydra entry point shares: config checks before Hydra runs, one-line user errors.

Hydra reports a bad override (a misspelt key, a wrong type, a missing `???` value) with a
multi-line message or a traceback and exit status 1, and it writes the run directory's `.hydra/`
files (config.yaml, hydra.yaml, overrides.yaml) and its log before the task runs. The contract is
one line on stderr, exit status 2, and nothing written for a refused run. So `precheck` composes
the config first, exactly as Hydra will (its own config loader; for a sweep, `-m` or
`hydra.mode: MULTIRUN`, every job of the basic sweeper, each composed from the master config as
Hydra composes it), and checks each job: no key added with `+` that the schema lacks, no missing
mandatory value, the entry point's own checks (`pkmlm-train`: every value, data paths, the memory
estimate). Only then does Hydra run; a run that the task refuses later (a resume conflict, a held
lock) gets its `.hydra/` files back as they were (`hydra_files_kept_on_refusal`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pkmlm.errors import UserError

# Hydra's own flags that take this process elsewhere (help, info, another config): left to Hydra.
HYDRA_ONLY_FLAGS = (
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--resolve",
    "--package",
    "-p",
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
    "--version",
)


# What to write after `key=` for the mandatory (`???`) values of the entry points' schemas.
REQUIRED_VALUES = {
    "checkpoint": "DIR (a run directory: its newest valid checkpoint; one checkpoints/step_XXXXXXXX.dcp "
    "directory; or a pkmlm-export directory)",
    "out": "DIR (the directory to write, new or empty)",
}


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the plain (non-Hydra) CLIs: a usage error (a missing or bad argument) is the
    contract's one line, `error: MESSAGE; usage: USAGE`, and exit status 2 (argparse prints its
    usage over several lines, then `PROG: error: ...`)."""

    def error(self, message: str) -> "NoReturn":  # noqa: F821
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        fail(f"{message}; usage: {usage}")


# Lines of OmegaConf's and Hydra's messages that say nothing to a user (templates, node types).
_NOISE = ("HYDRA_FULL_ERROR", "$VALUE", "full_key:", "reference_type=", "object_type=", "To append to your config")


def one_line(exc: BaseException) -> str:
    """A readable single line from an OmegaConf/Hydra exception chain (messages joined by ' | ')."""
    parts: list[str] = []
    while exc is not None:
        for line in str(exc).splitlines():
            line = line.strip()
            if line and not any(n in line for n in _NOISE) and line not in parts:
                parts.append(line)
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def user_errors_exit_2(fn: Callable) -> Callable:
    """Run a task function, turning UserError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))

    return wrapper


# --- the checks of one composed job ----------------------------------------------------------------


def _schema_keys(node_type: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema."""
    keys = []
    for f in dataclasses.fields(node_type):
        keys.append(prefix + f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _schema_keys(type(default), f"{prefix}{f.name}.")
    return keys


def added_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Keys of the composed `cfg` that its typed schema lacks: a typo added with `+` (Hydra lets
    `+key=value` add any key, even to a typed node, and the run would silently ignore it)."""
    from omegaconf import DictConfig, OmegaConf

    found = []
    schema = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if fields is not None and key not in fields:
            found.append(dotted)
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += added_keys(child, dotted + ".")
    return found


def check_job(cfg: Any, check: Optional[Callable[[Any], None]], required: dict[str, str]) -> None:
    """Raise UserError on the first problem of one composed task config (no `hydra` node)."""
    from omegaconf import OmegaConf

    for key in added_keys(cfg):
        schema = OmegaConf.get_type(cfg)
        known = _schema_keys(schema) if dataclasses.is_dataclass(schema) else []
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        raise UserError(
            f"unknown config key {key} (added with +; the schema has no such key)"
            + (f": did you mean {near[0]}?" if near else "; see docs/config.md for the keys")
        )
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise UserError(f"{key} is required: give {key}={required.get(key, 'VALUE')} on the command line")
    if check is not None:
        check(OmegaConf.to_object(cfg))


# --- composing as Hydra will ------------------------------------------------------------------------


@dataclasses.dataclass
class Planned:
    """What precheck found: the directories Hydra will write (a run's, or each job's of a sweep)."""

    multirun: bool
    job_dirs: list[Path]
    sweep_dir: Optional[Path] = None


def _jobs(loader: Any, master: Any) -> list[list[str]]:
    """The override lists of a sweep's jobs, as Hydra's basic sweeper makes them (its
    `hydra.sweeper.params`, then the command line's overrides); [] for another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(master.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return []
    params = master.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(master.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return BasicSweeper.split_arguments(parsed, None)[0]


def _job_label(jobs: list[list[str]], i: int) -> str:
    """`sweep job 1 (train.max_steps=0)`: the job's number and the overrides in which it differs."""
    varying = [o for o in jobs[i] if any(o not in other for other in jobs)]
    return f"sweep job {i}" + (f" ({' '.join(varying)})" if varying else "")


def _nearest_hint(loader: Any, config_name: str, error: BaseException) -> str:
    """`; did you mean train.max_steps?` for an override of a key the schema lacks."""
    import re

    from hydra.types import RunMode
    from omegaconf import OmegaConf

    match = re.search(r"Could not override '([^']+)'", one_line(error))
    if match is None:
        return ""
    try:
        schema = OmegaConf.get_type(_task(loader.load_configuration(config_name, [], RunMode.RUN)))
    except Exception:  # noqa: BLE001 - no hint then
        return ""
    near = difflib.get_close_matches(match.group(1), _schema_keys(schema), n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""


def _task(cfg: Any) -> Any:
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def precheck_overrides(
    config_dir: str,
    config_name: str,
    check: Optional[Callable[[Any], None]] = None,
    required: Optional[dict[str, str]] = None,
) -> Optional[Planned]:
    """Compose and check the config of every job before Hydra runs; a failure is one line on
    stderr and exit status 2. `check` takes a job's typed config (the entry point's own checks);
    `required` gives, per mandatory key, what to write after `key=` in the message. Returns the
    directories Hydra will write, or None when Hydra takes over itself (help, info, another config)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from pkmlm.paths import dir_problem

    argv = sys.argv[1:]
    if any(a.split("=", 1)[0] in HYDRA_ONLY_FLAGS for a in argv):
        return None
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    # `${pkmlm_now:...}` in hydra.run.dir: the same moment here and when Hydra resolves it again.
    os.environ.setdefault("PKMLM_RUN_TIME", datetime.datetime.now().isoformat())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            try:
                if not multirun:  # as Hydra decides: a preset may say hydra.mode: MULTIRUN
                    first = loader.load_configuration(
                        config_name, overrides, RunMode.RUN, validate_sweep_overrides=False
                    )
                    multirun = first.hydra.mode == RunMode.MULTIRUN
                master = loader.load_configuration(
                    config_name, overrides, RunMode.MULTIRUN if multirun else RunMode.RUN
                )
                jobs = _jobs(loader, master) if multirun else [list(master.hydra.overrides.task)]
            except Exception as e:  # noqa: BLE001 - any composition failure is about the user's overrides
                fail(f"bad config override: {one_line(e)}{_nearest_hint(loader, config_name, e)}")
            if not multirun:
                job_dirs = [Path(str(master.hydra.run.dir))]
                where = f"hydra.run.dir={str(job_dirs[0])!r}"
                sweep_dir = None
            else:
                sweep_dir = Path(str(master.hydra.sweep.dir))
                where = f"hydra.sweep.dir={str(sweep_dir)!r}"
                job_dirs = [sweep_dir / str(i) for i in range(len(jobs))]
            reason = dir_problem(job_dirs[0] if job_dirs else sweep_dir)
            if reason is not None:
                fail(
                    f"{where} cannot hold the run: {reason}; choose another "
                    + ("hydra.sweep.dir" if multirun else "hydra.run.dir")
                )
            for i, job in enumerate(jobs):
                try:
                    cfg = master if not multirun else loader.load_sweep_config(master, list(job))
                    check_job(_task(cfg.copy()), check, {**REQUIRED_VALUES, **(required or {})})
                except UserError as e:
                    fail(f"{_job_label(jobs, i)}: {e}" if multirun else str(e))
                except Exception as e:  # noqa: BLE001 - a composition or type error in one job's overrides
                    fail(f"bad config override{f' in {_job_label(jobs, i)}' if multirun else ''}: {one_line(e)}")
    finally:
        GlobalHydra.instance().clear()
    return Planned(multirun=multirun, job_dirs=job_dirs, sweep_dir=sweep_dir)


# --- a refused run leaves its directory as it was ---------------------------------------------------

HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")


def _snapshot(directory: Path) -> dict[Path, Optional[bytes]]:
    """The bytes of the files Hydra writes in `directory` (None: absent), and of its log files."""
    names = list(HYDRA_FILES) + ([p.name for p in directory.glob("*.log")] if directory.is_dir() else [])
    state: dict[Path, Optional[bytes]] = {}
    for name in names:
        path = directory / name
        state[path] = path.read_bytes() if path.is_file() else None
    return state


def _restore(directory: Path, state: dict[Path, Optional[bytes]], existed: bool) -> None:
    for path in [*state, *(directory.glob("*.log") if directory.is_dir() else [])]:
        before = state.get(path)
        with contextlib.suppress(OSError):
            if before is None:
                path.unlink(missing_ok=True)
            elif path.read_bytes() != before:
                path.write_bytes(before)
    if not existed:  # a directory Hydra made for this refused run: removed when nothing else is in it
        for empty in (directory / ".hydra", directory):
            with contextlib.suppress(OSError):
                empty.rmdir()


def _size(path: Path) -> Optional[int]:
    return path.stat().st_size if path.is_file() else None


@contextlib.contextmanager
def hydra_files_kept_on_refusal(planned: Optional[Planned]) -> Iterator[None]:
    """Around Hydra: when the task refuses the run (exit status 2) before it logged a metrics row,
    put back the `.hydra/` files and log Hydra wrote into its directories (pkmlm-compare labels a
    sweep's jobs from their overrides.yaml; a refused relaunch must not relabel them), and remove a
    directory that only this refused run created. A run that trained and then stopped with a user
    error (a non-finite streak) keeps Hydra's files: they describe it."""
    if planned is None:
        yield
        return
    extra = [planned.sweep_dir / "multirun.yaml"] if planned.sweep_dir is not None else []
    saved = {d: (_snapshot(d), d.exists()) for d in planned.job_dirs}
    saved_extra = {p: p.read_bytes() if p.is_file() else None for p in extra}
    metrics = {d: _size(d / "metrics.jsonl") for d in planned.job_dirs}
    try:
        yield
    except SystemExit as e:
        if e.code == 2:
            for directory, (state, existed) in saved.items():
                if _size(directory / "metrics.jsonl") == metrics[directory]:  # refused before its first row
                    _restore(directory, state, existed)
            for path, before in saved_extra.items():
                with contextlib.suppress(OSError):
                    if before is None:
                        path.unlink(missing_ok=True)
                    else:
                        path.write_bytes(before)
        raise


# --- pkmlm-train's own checks -----------------------------------------------------------------------


def check_train_job(cfg: Any) -> None:
    """Everything a training run can be refused for before it starts, cheapest first: every value
    (`pkmlm.config.validate`), the data's inputs (globs expanded, files stat'd, the prepared index
    read), the tokenizer and resume paths (a given tokenizer must define data.special_tokens), and
    whether the model fits the device's memory."""
    import torch

    from pkmlm.config import check_fits_device, validate
    from pkmlm.data.loader import resolve_data
    from pkmlm.data.tokenizer import check_special_tokens, load_tokenizer
    from pkmlm.train.rundir import check_input_paths
    from pkmlm.train.setup import pick_device

    validate(cfg)
    resolve_data(cfg.data)
    check_input_paths(cfg)
    if cfg.data.tokenizer and cfg.data.special_tokens:  # a given tokenizer is not extended: it must have them
        check_special_tokens(load_tokenizer(cfg.data.tokenizer), cfg.data)
    device = pick_device(cfg.train.device)
    if device.type == "cuda" and device.index is None:  # torchrun: this process's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    check_fits_device(cfg, device, world_size=int(os.environ.get("WORLD_SIZE", 1)))
