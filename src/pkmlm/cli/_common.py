"""What every Hydra entry point shares: config checks before Hydra runs, one-line user errors.

Hydra reports a bad override (a misspelt key, a wrong type, a missing `???` value) with a
multi-line message or a traceback and exit status 1. The contract is one line on stderr, exit
status 2, and nothing written for a refused run. So `precheck_overrides` composes the config
first, exactly as Hydra will (its own config loader; for a sweep, `-m` or `hydra.mode: MULTIRUN`,
every job of the basic sweeper, each composed from the master config as Hydra composes it: the
sweeper composes a job only when it launches it, and every job is checked before any trains), and
checks each job: no key added with `+` that the schema lacks, no missing mandatory value, the entry
point's own checks (`pkmlm-train`: `pkmlm.train.checks.check_run`, the same function `train()`
calls, once per process). Only then does Hydra run. Hydra itself writes nothing a refusal could
clobber: configs/config.yaml turns its `.hydra/` files off (pkmlm-train writes them once the task
has accepted the run: `hydra_files`) and opens its log file at the first record.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

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


# An entry point's own check of one job: its task config (a DictConfig without the `hydra` node),
# for a job of a sweep the sweep's directory (None for a single run), and the job's directory.
JobCheck = Callable[[Any, Optional[str], Path], None]


def check_job(
    cfg: Any, check: Optional[JobCheck], required: dict[str, str], sweep_dir: Optional[str], job_dir: Path
) -> None:
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
        check(cfg, sweep_dir, job_dir)


# --- composing as Hydra will ------------------------------------------------------------------------


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


def _job_dir(cfg: Any, num: int, multirun: bool) -> Path:
    """The directory Hydra gives job `num` (`hydra.sweep.dir/hydra.sweep.subdir`, the subdir
    resolved with `hydra.job.num` as Hydra's launcher sets it), or `hydra.run.dir` for one run."""
    from omegaconf import open_dict

    if not multirun:
        return Path(str(cfg.hydra.run.dir))
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.hydra.job.num = num
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def precheck_overrides(
    config_dir: str,
    config_name: str,
    check: Optional[JobCheck] = None,
    required: Optional[dict[str, str]] = None,
    writes_hydra_files: bool = False,
) -> None:
    """Compose and check the config of every job before Hydra runs; a failure is one line on
    stderr and exit status 2. `check` is the entry point's own check of a job (`JobCheck`);
    `required` gives, per mandatory key, what to write after `key=` in the message;
    `writes_hydra_files`: the task writes `.hydra/` itself (`hydra_files`), so a `hydra.output_subdir`
    the user sets (Hydra would write there before the task accepts the run) is refused. Hydra's own
    flags (help, info, another config) are left to Hydra."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from pkmlm.paths import dir_problem
    from pkmlm.train.rundir import check_not_locked

    argv = sys.argv[1:]
    if any(a.split("=", 1)[0] in HYDRA_ONLY_FLAGS for a in argv):
        return
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
            subdir = master.hydra.output_subdir
            if writes_hydra_files and subdir is not None:
                fail(
                    f"hydra.output_subdir={subdir!r}: pkmlm-train writes the run's .hydra/ files itself, once it "
                    "accepts the run (a refused run leaves its directory as it was); leave hydra.output_subdir unset"
                )
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            where = str(master.hydra.sweep.dir if multirun else master.hydra.run.dir)
            sweep_dir = where if multirun else None
            reason = dir_problem(Path(where) / "0" if multirun and jobs else Path(where))
            if reason is not None:
                fail(f"{key}={where!r} cannot hold the run: {reason}; choose another {key}")
            for i, job in enumerate(jobs):
                try:
                    cfg = master if not multirun else loader.load_sweep_config(master, list(job))
                    # A held lock (and the entry point's checks: a resume conflict) refused now,
                    # before Hydra's sweeper rewrites the sweep's multirun.yaml.
                    job_dir = _job_dir(cfg, i, multirun)
                    check_not_locked(job_dir)
                    check_job(_task(cfg.copy()), check, {**REQUIRED_VALUES, **(required or {})}, sweep_dir, job_dir)
                except UserError as e:
                    fail(f"{_job_label(jobs, i)}: {e}" if multirun else str(e))
                except Exception as e:  # noqa: BLE001 - a composition or type error in one job's overrides
                    fail(f"bad config override{f' in {_job_label(jobs, i)}' if multirun else ''}: {one_line(e)}")
    finally:
        GlobalHydra.instance().clear()


# --- Hydra's files, written by the task once it accepts the run ------------------------------------


def hydra_files(task_cfg: Any) -> dict[str, bytes]:
    """The `.hydra/` files Hydra writes before a job (config.yaml: `task_cfg`, as the task function
    received it; hydra.yaml; overrides.yaml), as Hydra writes them (`hydra.core.utils.run_job`),
    for the task to write once it has accepted the run: configs/config.yaml sets
    `hydra.output_subdir: null`, so that a run refused by the task (a held lock, a resume conflict)
    leaves a sweep job's `.hydra/overrides.yaml`, from which pkmlm-compare labels the job, as it
    was (the command line refuses a `hydra.output_subdir` the user sets: `precheck_overrides`)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}: what Hydra saves as hydra.yaml
    files = {"config.yaml": task_cfg, "hydra.yaml": hydra_cfg, "overrides.yaml": hydra_cfg.hydra.overrides.task}
    return {f".hydra/{name}": OmegaConf.to_yaml(node).encode() for name, node in files.items()}
