"""User-facing errors, and the one style in which config values are checked.

A `UserError` is a mistake in what the user gave us (a config value, a path, an offline Hub): the
CLI prints its one-line message on stderr and exits with status 2, without a traceback. Anything
else that escapes is a bug and keeps its traceback.

Config values are checked once, at the config boundary: each typed sub-config owns its rules in
its own `validate()` (`DataConfig.validate` for the data group that pkmlm-prepare and pkmlm-eval
share, `TrainConfig.validate`, ...), and `pkmlm.config.validate` adds the rules that span several
groups. Each rule is one `require(ok, key, value, allowed)`; a value with a fixed set of choices is
declared once, as a `Literal` beside the code that branches on it, and checked by `require_one_of`,
whose message lists them. Constructors trust their typed arguments. `checked_once` makes a check of
a config value run once per process however many entry points ask for it (docs/architecture.md,
"How config rules are owned").
"""

from __future__ import annotations

import functools
import typing
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem in the user's input, reported as one line on stderr (exit status 2)."""


class ConfigError(UserError):
    """A bad config value: names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r} is invalid: {allowed}")


class DataError(UserError):
    """A bad data file or record (in strict mode), naming the file and where in it."""


class UnsafeCheckpointError(UserError):
    """A checkpoint file that would run code when loaded: refused, never skipped
    (`pkmlm.checkpoint.safe`)."""


class NotACheckpointError(UserError):
    """A file with valid checksums that is not what a pkmlm checkpoint holds there (skippable)."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise `ConfigError(key, value, allowed)` unless `ok`: the one way a config value is checked."""
    if not ok:
        raise ConfigError(key, value, allowed)


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a `Literal[...]` type: the one declaration of a setting's allowed values."""
    return typing.get_args(literal)


def require_one_of(key: str, value: object, literal: Any) -> None:
    """`require` for a setting with a fixed set of values, read from its `Literal` (never retyped)."""
    allowed = choices(literal)
    require(value in allowed, key, value, "one of " + ", ".join(allowed))


# The checks of config values that passed in this process, by check and value (the repr of the
# config dataclass, which shows every field, or the check's own `key`): the process-level memo
# behind `checked_once`. Only a pass is remembered, so a bad value is refused every time it is asked about.
_PASSED: dict[tuple[str, str], Any] = {}


def checked_once(check: Optional[Callable[[Any], T]] = None, *, key: Callable[[Any], str] = repr) -> Any:
    """Run `check(cfg)` once per process for each distinct config value and return its first result.

    The command line checks every job before Hydra starts and `train()` checks the config it is
    given (it is also called from Python); with this, a run started from the command line checks
    its config once (tests/e2e/test_config_train.py counts it). `key(cfg)` names the value
    (default `repr`); a check whose rules ignore part of its value leaves that part out of the key
    (`@checked_once(key=...)`; `ModelConfig.validate` does, for the vocabulary size)."""
    if check is None:
        return functools.partial(checked_once, key=key)

    @functools.wraps(check)
    def once(cfg: Any) -> T:
        memo = (f"{check.__module__}.{check.__qualname__}", key(cfg))
        if memo not in _PASSED:
            _PASSED[memo] = check(cfg)
        return _PASSED[memo]

    return once
