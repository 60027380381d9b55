"""Where metrics go: ``metrics.jsonl`` in the run directory, a console progress bar, wandb.

Only rank 0 should create these (the caller decides). wandb is imported only when a
:class:`WandbSink` with a mode other than ``disabled`` is created.

``metrics.jsonl`` format (docs/architecture.md, "Run directory"): one JSON object per line, each with
``step`` and ``tokens``. Non-finite floats (NaN, ±inf) are written as ``null``: ``NaN`` and
``Infinity`` are not JSON and break strict readers (jq, pandas' ``lines=True`` reader is lenient,
JavaScript is not). A reader sees ``null`` as "no finite value".
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, TextIO

from tqdm import tqdm

from pkmlm.errors import UserError, checked_once, require_one_of
from pkmlm.metrics.formatting import duration as _duration
from pkmlm.metrics.formatting import number as _number
from pkmlm.metrics.formatting import si as _si

__all__ = [
    "MetricsFile",
    "read_metrics",
    "latest_by_step",
    "ConsoleProgress",
    "WandbSink",
    "Sinks",
    "format_summary",
]

REQUIRED_KEYS = ("step", "tokens")
# logging.wandb.mode: online | offline (files in the run dir, `wandb sync` later) | disabled
WandbMode = Literal["online", "offline", "disabled"]


@checked_once  # the config's check (WandbConfig.validate) and WandbSink, built directly too, ask
def check_wandb_mode(mode: str) -> None:
    """`logging.wandb.mode` is one of `WandbMode`."""
    require_one_of("logging.wandb.mode", mode, WandbMode)


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats -> None; 1-element tensors/numpy scalars -> Python."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # torch / numpy scalar (a tensor here is a host sync: caller's call)
        return _jsonable(value.item())
    raise TypeError(f"cannot write {type(value).__name__} to metrics.jsonl: {value!r}")


class MetricsFile:
    """Appends rows to ``metrics.jsonl`` (``path``; a directory means ``path/metrics.jsonl``).

    Each row goes out in ONE ``os.write`` on a descriptor opened with ``O_APPEND``: there is no
    user-space buffer to flush, the line reaches the kernel whole before ``write`` returns, and a
    killed process can at worst leave its last line torn (which :func:`read_metrics` skips).
    ``fsync=True`` also forces every row to disk (survives power loss; costs a disk round trip per
    row); :meth:`close` always fsyncs.

    Opening a file whose last line is torn (a previous crash mid-write) first ends that line with
    a newline, so new rows never glue onto the fragment; the fragment then stays as one
    unparsable line, which :func:`read_metrics` skips with a warning.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = False):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):  # a run directory: its metrics.jsonl
            self.path = os.path.join(self.path, "metrics.jsonl")
        self.fsync = fsync
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size > 0:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    self._write_all(b"\n")

    def _write_all(self, data: bytes) -> None:
        written = os.write(self._fd, data)
        if written != len(data):  # a regular file only does this on a full disk or a quota
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row; it must contain ``step`` and ``tokens`` (ValueError otherwise)."""
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        missing = [key for key in REQUIRED_KEYS if key not in row]
        if missing:
            raise ValueError(f"metrics row lacks {missing}: {dict(row)!r}")
        line = json.dumps(_jsonable(row), allow_nan=False, ensure_ascii=False) + "\n"
        self._write_all(line.encode("utf-8"))
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> MetricsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike, dedupe: bool = True) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file, in file order.

    Tolerant of crashes: a torn LAST line (no newline, not parsable) is skipped silently; an
    unparsable line elsewhere (a torn line that a resumed run wrote after), or a line that is not
    an object with a ``step``, is skipped with a ``warnings.warn`` naming the line number.
    With ``dedupe`` the rows go through :func:`latest_by_step` (rows re-logged after a resume
    replace the earlier ones).
    """
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # After the final "\n" split() leaves b""; anything else there is a line without its newline.
    last_complete = data.endswith(b"\n")
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_tail = number == len(lines) and not last_complete
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if not is_tail:
                warnings.warn(f"{os.fspath(path)}:{number}: skipping unparsable line", stacklevel=2)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            warnings.warn(f"{os.fspath(path)}:{number}: skipping a line without an integer step", stacklevel=2)
            continue
        rows.append(row)
    return latest_by_step(rows) if dedupe else rows


def latest_by_step(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Drop rows superseded by a resume; the surviving rows keep their order.

    A run logs non-decreasing steps. A resumed run restarts from its checkpoint, so its first row
    has a step at or below the last step already in the file; from there on the new rows are the
    truth (docs/architecture.md: "readers take the last row for a step"). Two rules, applied in file
    order:

    1. a row whose step is LOWER than the step of the row before it marks a restart at that
       step: every earlier row with ``step >=`` it is dropped;
    2. a row with the same step AND the same set of keys as an earlier row replaces it (a re-run
       step whose first logged row equals the old last step; also a repeated final eval).
       Rows of one step with different keys (a training row and a validation row) are all kept.
    """
    # Invariant: ``kept`` is sorted by step, so both rules only touch its tail (linear time).
    kept: list[dict] = []
    for row in rows:
        row = dict(row)
        step = row["step"]
        if kept and kept[-1]["step"] > step:  # rule 1: a restart
            while kept and kept[-1]["step"] >= step:
                kept.pop()
        keys = frozenset(row)
        position = len(kept) - 1
        while position >= 0 and kept[position]["step"] == step:  # rule 2: same step, same keys
            if frozenset(kept[position]) == keys:
                del kept[position]
            position -= 1
        kept.append(row)
    return kept


# --------------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------------


class ConsoleProgress:
    """Training progress on stderr: step/total, loss, lr, tokens/s and time left.

    On a terminal it is a tqdm bar (tqdm's own rate and ETA). When stderr is not a terminal (CI,
    ``| tee``, a SLURM log) a bar would be one ever-growing line of carriage returns, so instead it
    prints a plain line at most every ``log_interval_s`` seconds (and on the last step), e.g.
    ``step 120/1000 (12%) | loss 4.1234 | lr 3.00e-04 | 45.1k tok/s | 1m02s elapsed, 7m35s left``.
    ``enabled=False`` makes every method a no-op (non-zero ranks, quiet runs).
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        file: TextIO | None = None,
        tty: bool | None = None,
        log_interval_s: float = 30.0,
    ):
        self.total_steps = int(total_steps)
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.file, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.log_interval_s = log_interval_s
        self.step = int(initial_step)
        self._initial_step = int(initial_step)
        self._start = time.monotonic()
        self._last_line = -math.inf
        self._bar = None
        self._fields: dict[str, str] = {}  # the latest loss / lr / tok/s, shown until replaced
        if enabled and tty:
            self._bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                file=self.file,
                unit="step",
                dynamic_ncols=True,
                smoothing=0.1,
                leave=True,
            )

    def update(
        self, step: int, loss: float | None = None, lr: float | None = None, tokens_per_s: float | None = None
    ) -> None:
        """Move to ``step`` (optimizer steps completed) and show the latest values given."""
        if not self.enabled:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if lr is not None:
            fields["lr"] = f"{lr:.2e}"
        if tokens_per_s is not None:
            fields["tok/s"] = _si(tokens_per_s)
        advance = step - self.step
        self.step = step
        self._fields.update(fields)
        if self._bar is not None:
            if fields:
                self._bar.set_postfix(self._fields, refresh=False)
            self._bar.update(advance)
            return
        now = time.monotonic()
        if now - self._last_line >= self.log_interval_s or step >= self.total_steps:
            self._last_line = now
            self._print(self._plain_line(self._fields, now - self._start))

    def _plain_line(self, fields: dict[str, str], elapsed: float) -> str:
        percent = 100.0 * self.step / self.total_steps if self.total_steps else 100.0
        parts = [f"step {self.step}/{self.total_steps} ({percent:.0f}%)"]
        parts += [f"{key} {value}" if key != "tok/s" else f"{value} tok/s" for key, value in fields.items()]
        done = self.step - self._initial_step
        left = (self.total_steps - self.step) * elapsed / done if done > 0 else math.inf
        parts.append(f"{_duration(elapsed)} elapsed, {_duration(left)} left")
        return " | ".join(parts)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            tqdm.write(line, file=self.file)
        else:
            self._print(line)

    def _print(self, line: str) -> None:
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------------------------
# wandb
# --------------------------------------------------------------------------------------------


class WandbSink:
    """Weights & Biases logging; ``mode`` is ``logging.wandb.mode``: online | offline | disabled.

    ``disabled`` does nothing and never imports wandb. ``offline`` writes the run under
    ``dir/wandb/`` with no network (``wandb sync`` uploads it later). ``online`` needs credentials;
    a failing ``wandb.init`` becomes a one-line :class:`UserError` suggesting offline mode.

    Rows are plotted against our own ``step`` field (``define_metric("*", step_metric="step")``)
    rather than wandb's internal step, which must only increase: after a resume the re-run steps
    are logged again instead of being dropped with a warning each.
    ``run_id`` (optional) continues that wandb run (``resume="allow"``) instead of starting anew.
    ``config`` should be a plain dict (``OmegaConf.to_container(cfg, resolve=True)``).
    """

    def __init__(
        self,
        mode: str,
        project: str,
        name: str | None,
        group: str | None,
        config: Mapping[str, Any],
        dir: str | os.PathLike,
        entity: str | None = None,
        tags: Iterable[str] | None = None,
        run_id: str | None = None,
    ):
        check_wandb_mode(mode)  # also built directly, not only from a config: once per process
        self.mode = mode
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError as error:
            raise UserError(
                f"logging.wandb.mode={mode} needs the wandb package ({error}); "
                "install it or set logging.wandb.mode=disabled"
            ) from None
        os.makedirs(dir, exist_ok=True)
        try:
            self.run = wandb.init(
                mode=mode,
                project=project,
                name=name,
                group=group,
                entity=entity,
                config=dict(config),
                dir=os.fspath(dir),
                tags=list(tags) if tags else None,
                id=run_id,
                resume="allow" if run_id else None,
            )
        except wandb.errors.Error as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise UserError(
                f"wandb.init failed (logging.wandb.mode={mode}): {message}; "
                "set logging.wandb.mode=offline to log locally without an "
                "account (or disabled)"
            ) from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, row: Mapping[str, Any], step: int | None = None) -> None:
        """Log a metrics row; ``step`` defaults to ``row["step"]``."""
        if self.run is None:
            return
        row = dict(row)
        if step is not None:
            row["step"] = step
        self.run.log(row)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(dict(values))

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


# --------------------------------------------------------------------------------------------
# Fan-out and end-of-run summary
# --------------------------------------------------------------------------------------------


@dataclass
class Sinks:
    """The run's sinks together: ``log(row)`` goes to metrics.jsonl and wandb.

    The console bar is driven by the training loop itself (``sinks.console.update(...)``), which
    updates it more often than it writes rows; ``console.write`` prints lines beside the bar (only
    with ``logging.progress``), ``notice`` prints what the user must see whatever the console
    settings (a stop signal's checkpoint line), on the main rank. Processes other than rank 0 get
    ``metrics_file=None``, a disabled console and a disabled wandb sink.

    As a context manager (how the training loop holds it): every sink is closed on exit, wandb with
    exit code 1 when the block raised (the run is marked failed, never left open), and then a
    failure to close never hides the block's own error.
    """

    metrics_file: MetricsFile | None
    console: ConsoleProgress
    wandb: WandbSink | None = None
    main: bool = True

    def log(self, row: Mapping[str, Any]) -> None:
        self.write_row(row)
        if self.wandb is not None:
            self.wandb.log(row)

    def write_row(self, row: Mapping[str, Any]) -> None:
        """metrics.jsonl alone (the end-of-run accounting row, which wandb gets as its summary)."""
        if self.metrics_file is not None:
            self.metrics_file.write(row)

    def notice(self, line: str) -> None:
        if self.console.enabled:
            self.console.write(line)
        elif self.main:
            print(line, file=sys.stderr, flush=True)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary(values)

    def close(self, exit_code: int = 0) -> None:
        """Close every sink, even if one of them fails (the first error is raised after)."""
        errors = []
        closers = [self.console.close]
        if self.metrics_file is not None:
            closers.append(self.metrics_file.close)
        if self.wandb is not None:
            closers.append(lambda: self.wandb.close(exit_code))
        for close in closers:
            try:
                close()
            except Exception as error:  # noqa: BLE001 - re-raised below
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(exit_code=0)
            return
        try:
            self.close(exit_code=1)
        except Exception:  # noqa: BLE001 - the block's own error is the one to report
            pass


_MEMORY_KEY = re.compile(r"^memory/layer(\d+)/usage$")


def format_summary(metrics: Mapping[str, Any], run_dir: str | os.PathLike, wall_time_s: float | None = None) -> str:
    """End-of-run block for the console.

    ``metrics`` is a metrics.jsonl-style row: ``val/loss`` and ``val/ppl`` (``loss``/``ppl`` as
    printed by :func:`evaluate` are accepted too), ``tokens`` (training tokens), optionally
    ``step`` and ``wall_time_s`` (or pass ``wall_time_s``), and ``memory/layer{i}/usage``,
    ``kl_weight``, ``kl_count`` for each memory layer. Missing or null values print as ``n/a``.
    """

    def pick(*keys: str) -> Any:
        for key in keys:
            if key in metrics:
                return metrics[key]
        return None

    if wall_time_s is None:
        wall_time_s = pick("wall_time_s")
    loss, ppl, tokens, step = pick("val/loss", "loss"), pick("val/ppl", "ppl"), pick("tokens"), pick("step")
    lines = ["── run summary " + "─" * 45]
    if step is not None:
        lines.append(f"  step           {step}")
    lines.append(f"  val loss       {_number(loss, '.4f')}   ppl {_number(ppl, '.2f')}")
    tokens_text = "n/a" if tokens is None else f"{_si(tokens)} ({int(tokens):,})"
    lines.append(f"  train tokens   {tokens_text}")
    stopped = pick("stopped_by")
    if stopped is not None:
        lines.append(f"  stopped by     {stopped}")
    lines.append("  wall time      " + ("n/a" if wall_time_s is None else _duration(float(wall_time_s))))
    layers = sorted(int(m.group(1)) for key in metrics if (m := _MEMORY_KEY.match(key)))
    if layers:
        lines.append(f"  {'memory':<12} {'usage':>8} {'kl_weight':>10} {'kl_count':>10}")
        for i in layers:
            usage = metrics.get(f"memory/layer{i}/usage")
            usage_text = "n/a" if _number(usage, ".1%") == "n/a" else f"{usage:.1%}"
            lines.append(
                f"  {f'layer {i}':<12} {usage_text:>8} "
                f"{_number(metrics.get(f'memory/layer{i}/kl_weight'), '.4f'):>10} "
                f"{_number(metrics.get(f'memory/layer{i}/kl_count'), '.4f'):>10}"
            )
    lines.append(f"  run dir        {os.fspath(run_dir)}")
    lines.append("─" * 60)
    return "\n".join(lines)
