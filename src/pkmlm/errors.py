"""User-facing errors, and the one style in which config values are checked.

A `UserError` is a mistake in what the user gave us (a config value, a path, an offline Hub): the
CLI prints its one-line message on stderr and exits with status 2, without a traceback. Anything
else that escapes is a bug and keeps its traceback.

Config values are checked once, at the config boundary (`pkmlm.config.validate`, and
`pkmlm.data.config.check_data_config` for the data group that pkmlm-prepare and pkmlm-eval share),
each with `require(ok, key, value, allowed)`; constructors trust their typed arguments.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input, reported as one line on stderr (exit status 2)."""


class ConfigError(UserError):
    """A bad config value: names the key, the bad value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r} is invalid: {allowed}")


class DataError(UserError):
    """A bad data file or record (in strict mode), naming the file and where in it."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise `ConfigError(key, value, allowed)` unless `ok`: the one way a config value is checked."""
    if not ok:
        raise ConfigError(key, value, allowed)
