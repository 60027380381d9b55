"""What every Hydra entry point shares: one-line user errors, and config checks before Hydra runs.

Hydra reports a bad override (a misspelt key, a wrong type) with a multi-line message and exit
status 1. The contract is one line on stderr and exit status 2, so before handing over to Hydra we
compose the config once ourselves (fast, no side effects) and report any failure in one line.
Sweeps (`-m` with comma lists or sweep functions) are checked per job instead.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from pkmlm.errors import UserError


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def one_line(exc: BaseException) -> str:
    """A readable single line from an OmegaConf/Hydra exception chain (messages joined by ' | ')."""
    parts: list[str] = []
    while exc is not None:
        for line in str(exc).splitlines():
            line = line.strip()
            if line and "HYDRA_FULL_ERROR" not in line and line not in parts:
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


def check_run_dir(config_dir: str, config_name: str) -> None:
    """`hydra.run.dir` must be a directory this user can create and write: Hydra creates it before
    the task runs and fails with a traceback, so it is checked here first (single runs; the jobs of
    a sweep fail in their own directories)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pkmlm.train.rundir import unusable_dir_reason

    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    if flags:
        return  # sweeps, help, info: nothing is written to hydra.run.dir here
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=sys.argv[1:], return_hydra_config=True)
            run_dir = str(cfg.hydra.run.dir)
    except Exception:  # a sweep override or anything Hydra reports itself
        return
    finally:
        GlobalHydra.instance().clear()
    reason = unusable_dir_reason(run_dir)
    if reason is not None:
        fail(f"hydra.run.dir={run_dir!r} cannot hold the run: {reason}; choose another hydra.run.dir")


def precheck_overrides(config_dir: str, config_name: str) -> None:
    """Compose the config from sys.argv's overrides; a failure is a user error (one line, exit 2)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if any(a in ("-m", "--multirun") for a in sys.argv[1:]) or any(
        a in sys.argv[1:] for a in ("--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--resolve")
    ):
        return  # sweeps are checked per job; help/info need Hydra itself
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        if any(o.is_sweep_override() for o in parsed):
            return
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[a for a in args if not a.startswith("hydra.")])
            from omegaconf import OmegaConf

            OmegaConf.resolve(cfg)
    except Exception as e:  # any composition failure here is about the user's overrides
        fail(f"bad config override: {one_line(e)}")
    finally:
        GlobalHydra.instance().clear()
