#!/usr/bin/env python
"""Fault injection for pkmlm training: kill -9 at random moments, stop signals, a full disk and
corrupted checkpoints; resume after each, and check the final state equals an uninterrupted run's.

    .venv/bin/python scripts/fault_inject.py                          # the long version: 100 kills
    .venv/bin/python scripts/fault_inject.py --kills 10 --steps 60    # what `make test` runs
    .venv/bin/python scripts/fault_inject.py --extra data.num_workers=2 --kills 30

Scenarios (all on one tiny config with a memory layer, dropout, gradient accumulation,
`checkpoint.interval=1`, `logging.interval=1`, a 15-document corpus so the run crosses epochs):

- baseline: one uninterrupted run;
- kills: a run that is SIGKILLed at random moments (start-up, mid-step, mid-checkpoint-write,
  mid-evaluation) `--kills` times, resumed with `resume=auto` after each, then left to finish;
  every `--corrupt-every`-th kill is followed by damaging the newest checkpoint (truncation, a bit
  flip in the middle, a deleted checksum, an emptied file), which the next resume must detect and
  skip. After every kill: no valid checkpoint was lost, at most `checkpoint.interval` logged steps
  were lost, the only unverifiable checkpoint is a partial write newer than the newest valid one;
- signals: SIGTERM, SIGUSR1 and SIGINT, one per run, each mid-training: exit status 0 within
  `--signal-timeout` seconds with a checkpoint at the step reached, then resumed;
- disk full: after a few checkpoints the run's file-size limit (RLIMIT_FSIZE, set from outside with
  prlimit) drops below a checkpoint's size, so the next checkpoint write fails in the kernel
  (EFBIG): exit status 2 with a one-line error, no traceback, the previous checkpoint intact, no
  temporary file left; then resumed.

Each scenario's final checkpoint must equal the baseline's exactly (model, optimizer, data
pipeline state, RNG states, step, tokens) and so must its metrics (`train/loss` of every step,
every validation row, deduplicated as readers do). Exit status 0 when every check passes.

How: this process imports pkmlm once and forks every training run as a child that runs the real
`pkmlm-train` entry point (`pkmlm.cli.train.main`, Hydra included) with its output in a log
file. Forking skips the 2-4 s of interpreter and import start-up per run, so tens of kills fit in a
minute; kills are real SIGKILLs of real processes. The parent runs no torch operation until every
child has finished (a forked OpenMP runtime is not safe to reuse).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import resource
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CORRUPTIONS = ("truncate", "bitflip", "no_checksum", "empty")


def tiny_config(corpus: Path, steps: int) -> list[str]:
    """A run of a few seconds on one CPU core that still exercises every piece of state."""
    return [
        "model.dim=64",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.max_seq_len=64",
        "model.dropout=0.1",  # dropout draws from the torch RNG: resume must restore it
        "model.memory.layers=[1]",
        "model.memory.n_keys=16",
        "model.memory.heads=2",
        "model.memory.knn=4",
        "model.memory.k_dim=16",
        "model.memory.value_dropout=0.1",
        f"data.files=[{corpus}]",
        "data.seq_len=32",
        "data.vocab_size=512",
        "data.tokenizer_docs=40",
        "data.val_docs=3",
        "data.shuffle_buffer=8",
        "train.batch_size=4",
        "train.micro_batch_size=2",  # gradient accumulation over 2 micro-batches
        f"train.max_steps={steps}",
        "train.device=cpu",
        "optim.warmup_steps=2",
        f"eval.interval={max(1, steps // 3)}",
        "eval.max_batches=2",
        "checkpoint.interval=1",
        "checkpoint.keep_last=2",
        "logging.interval=1",
        "logging.wandb.mode=disabled",
        "logging.progress=true",  # lines in the logs
    ]


def write_corpus(source: Path, dest: Path, n_docs: int) -> Path:
    """The first `n_docs` records of `source` (a .jsonl.gz): small, so that a run crosses epochs."""
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n_docs)]
    dest.write_text("".join(lines), encoding="utf-8")
    return dest


# --- child processes ----------------------------------------------------------------------------


class Child:
    """One training run, forked from this process; its stdout and stderr go to `log`."""

    def __init__(self, argv: list[str], log: Path):
        self.log = log
        self.started = time.monotonic()
        self.status: Optional[int] = None  # exit status; -N when killed by signal N
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.argv = ["pkmlm-train", *argv]
                from pkmlm.cli.train import main

                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid

    def poll(self) -> Optional[int]:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def wait(self, timeout: float) -> Optional[int]:
        """Exit status, or None if still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.status

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        self.status = os.waitstatus_to_exitcode(status)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def own_children() -> list[int]:
    """Live child processes of this process (after the runs have ended: orphans reparented here)."""
    me, kids = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:  # field 4, after "pid (comm) state"
                kids.append(int(entry))
    return kids


# --- inspecting a run directory (no torch: files and checksums only) ---------------------------


def checkpoint_files(run_dir: Path) -> list[Path]:
    from pkmlm.checkpoint.store import list_checkpoints

    return list_checkpoints(run_dir / "checkpoints")


def newest_valid_step(run_dir: Path) -> int:
    from pkmlm.checkpoint.store import step_of, verify

    valid = [step_of(p) for p in checkpoint_files(run_dir) if verify(p) is None]
    return max(valid, default=0)


def invalid_steps(run_dir: Path) -> list[int]:
    from pkmlm.checkpoint.store import step_of, verify

    return [step_of(p) for p in checkpoint_files(run_dir) if verify(p) is not None]


def temporaries(run_dir: Path) -> list[str]:
    """Checkpoint directories being written or deleted (`.step_XXXXXXXX.dcp.tmp`, `.del`)."""
    ckpt = run_dir / "checkpoints"
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".step_")) if ckpt.is_dir() else []


def metrics_size(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.stat().st_size if path.exists() else 0


def rows_since(run_dir: Path, offset: int) -> tuple[list[dict], int]:
    """Rows appended to metrics.jsonl after byte `offset`, and how many appended lines were torn."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    rows, torn = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            torn += 1
    return rows, torn


def train_steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows if "train/loss" in r]


def corrupt(checkpoint: Path, how: str, rng: random.Random) -> None:
    """Damage a checkpoint the way disks and careless copies do (its tensor file, or its manifest)."""
    if how == "no_checksum":
        (checkpoint / "checksums.sha256").unlink()
        return
    path = next(checkpoint.glob("*.distcp"))
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(1, len(data))])
    elif how == "bitflip":
        i = len(data) // 2 + rng.randrange(-len(data) // 4, len(data) // 4)
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


# --- scenarios -----------------------------------------------------------------------------------


@dataclass
class Report:
    steps: int
    checkpoint_interval: int = 1
    baseline_s: float = 0.0
    startup_s: float = 0.0
    runs_tried: int = 0
    kills: int = 0
    kills_during_startup: int = 0
    resumed: int = 0
    steps_lost: int = 0
    max_steps_lost_per_kill: int = 0
    steps_rerun: int = 0
    partial_writes: int = 0  # checkpoint files or temporaries a kill left half-written
    corruptions_injected: list = field(default_factory=list)
    corruptions_detected: int = 0  # unusable checkpoints a resume reported and skipped
    torn_metric_lines: int = 0
    orphans_left: int = 0  # processes of a finished or killed run (DataLoader workers) still alive 10 s later
    signals: list = field(default_factory=list)
    disk_full: dict = field(default_factory=dict)
    epochs_crossed: int = 0
    equal: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok


class Harness:
    def __init__(self, work: Path, base_args: list[str], report: Report, rng: random.Random):
        self.work, self.base_args, self.report, self.rng = work, base_args, report, rng
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.n = 0
        # Become the parent of every orphan our runs leave (Linux PR_SET_CHILD_SUBREAPER), so that
        # DataLoader workers outliving a killed run are seen, counted and reaped here.
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER

    def reap_orphans(self, timeout: float = 10.0) -> None:
        """Wait for the processes a finished run left behind; count (and kill) those that stay."""
        deadline = time.monotonic() + timeout
        while True:
            left = [pid for pid in own_children() if not os.waitpid(pid, os.WNOHANG)[0]]  # reaps the dead
            if not left:
                return
            if time.monotonic() > deadline:
                self.report.orphans_left += len(left)
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                return
            time.sleep(0.01)

    def start(self, run_dir: Path, kind: str, *extra: str) -> Child:
        self.reap_orphans()
        self.n += 1
        log = self.work / "logs" / f"{self.n:03d}-{kind}.log"
        return Child([*self.base_args, *extra, f"hydra.run.dir={run_dir}"], log)

    def baseline(self) -> Path:
        run_dir = self.work / "baseline"
        child = self.start(run_dir, "baseline")
        first_row = None
        while child.poll() is None:
            if first_row is None and metrics_size(run_dir) > 0:
                first_row = time.monotonic() - child.started
            time.sleep(0.005)
        elapsed = time.monotonic() - child.started
        if child.status != 0:
            raise SystemExit(
                f"the baseline run failed (exit {child.status}); see {child.log}:\n{child.output()[-3000:]}"
            )
        self.report.baseline_s = elapsed
        self.report.startup_s = first_row or elapsed
        return run_dir

    # kill -9 -----------------------------------------------------------------------------------

    def kills(self, n_kills: int, corrupt_every: int) -> Path:
        r = self.report
        run_dir = self.work / "kills"
        steps, startup = r.steps, r.startup_s
        step_s = max(1e-3, (r.baseline_s - startup) / max(1, steps - 1))
        logged: list[int] = []  # every training row any attempt logged, in order
        corruption_loss = 0  # steps a damaged checkpoint sent the next resume back by
        pending: Optional[str] = None  # the checkpoint damaged after the last kill
        while True:
            valid_before = newest_valid_step(run_dir)
            partial_before = set(invalid_steps(run_dir)) | set(temporaries(run_dir))
            offset = metrics_size(run_dir)
            child = self.start(run_dir, "kill" if r.kills < n_kills else "finish")
            r.runs_tried += 1
            if r.kills < n_kills:
                # A quarter of the kills land during start-up (config, Hydra, resume, data set-up),
                # the rest a random time after the run's first logged step, spread so that the
                # remaining kills cover the remaining steps.
                during_startup = self.rng.random() < 0.25
                extra = self.rng.uniform(
                    0.0, startup if during_startup else 2 * (steps - valid_before) * step_s / (n_kills - r.kills + 1)
                )
                deadline = child.started + extra if during_startup else None
                last_allowed = steps - (n_kills - r.kills)  # never let it finish while kills remain
                while child.poll() is None:
                    reached = max(train_steps(rows_since(run_dir, offset)[0]), default=0)
                    if reached >= last_allowed:
                        break
                    if deadline is None and reached:
                        deadline = time.monotonic() + extra
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    time.sleep(0.005)
                if child.poll() is None:
                    child.kill()
                    r.kills += 1
            else:
                child.wait(600)
            rows, torn = rows_since(run_dir, offset)
            r.torn_metric_lines += torn
            done = train_steps(rows)
            logged += done
            out = child.output()
            r.resumed += "resumed from" in out
            detected = re.findall(r"skipping unusable checkpoint \S*(step_\d{8}\.dcp)", out)
            r.corruptions_detected += len(detected)
            if pending is not None and (done or child.status == 0 or "resumed from" in out):
                r.check(pending in detected, f"run {self.n}: the damaged {pending} was not reported and skipped")
                pending = None
            valid_after = newest_valid_step(run_dir)
            if child.status is not None and child.status < 0:  # killed
                lost = max(0, max(done, default=0) - valid_after)
                r.kills_during_startup += not done and valid_after == valid_before
                r.steps_lost += lost
                r.max_steps_lost_per_kill = max(r.max_steps_lost_per_kill, lost)
                r.check(
                    valid_after >= valid_before,
                    f"run {self.n}: the newest valid checkpoint went back from {valid_before} to {valid_after}",
                )
                r.check(lost <= r.checkpoint_interval, f"run {self.n}: {lost} logged steps lost at one kill")
                bad = invalid_steps(run_dir)
                r.check(
                    all(s > valid_after for s in bad),
                    f"run {self.n}: unverifiable checkpoints {bad} older than the newest valid {valid_after}",
                )
                r.partial_writes += len((set(bad) | set(temporaries(run_dir))) - partial_before)
                # One damaged checkpoint per `corrupt_every` kills (caught up when one cannot be made).
                if pending is None and corrupt_every and len(r.corruptions_injected) < r.kills // corrupt_every:
                    pending = self._corrupt_newest(run_dir)
                    corruption_loss += valid_after - newest_valid_step(run_dir) if pending else 0
                continue
            r.check(child.status == 0, f"run {self.n}: exit status {child.status}: {out[-2000:]}")
            break
        r.steps_rerun = len(logged) - len(set(logged))
        r.check(sorted(set(logged)) == list(range(1, steps + 1)), "the logged steps are not exactly 1..max_steps")
        # Each re-logged step is accounted for by exactly one loss: a kill or a damaged checkpoint.
        r.check(
            r.steps_rerun == r.steps_lost + corruption_loss,
            f"{r.steps_rerun} steps re-run, but {r.steps_lost} lost at kills + {corruption_loss} to damage",
        )
        r.check(r.kills >= n_kills, f"only {r.kills} of {n_kills} kills landed before the run finished")
        r.check(newest_valid_step(run_dir) == steps, "the killed run did not reach its last step")
        return run_dir

    def _corrupt_newest(self, run_dir: Path) -> Optional[str]:
        """Damage the newest checkpoint when an older valid one remains to fall back on."""
        from pkmlm.checkpoint.store import verify

        files = [p for p in checkpoint_files(run_dir) if verify(p) is None]
        if len(files) < 2 or files[-1] != checkpoint_files(run_dir)[-1]:
            return None
        how = CORRUPTIONS[len(self.report.corruptions_injected) % len(CORRUPTIONS)]
        corrupt(files[-1], how, self.rng)
        self.report.corruptions_injected.append(f"{how}:{files[-1].name}")
        return files[-1].name

    # stop signals -------------------------------------------------------------------------------

    def signals(self, timeout: float) -> Path:
        r = self.report
        run_dir = self.work / "signals"
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            start_step = newest_valid_step(run_dir)
            target = min(r.steps - 1, start_step + self.rng.randint(2, 5))
            child = self.start(run_dir, sig.name)
            r.runs_tried += 1
            while child.poll() is None and max(train_steps(rows_since(run_dir, 0)[0]), default=0) < target:
                time.sleep(0.005)
            if child.status is not None:
                r.check(False, f"{sig.name}: the run ended (exit {child.status}) before the signal was sent")
                continue
            sent = time.monotonic()
            os.kill(child.pid, sig)
            status = child.wait(timeout)
            latency = time.monotonic() - sent
            if status is None:
                child.kill()
            reached = max(train_steps(rows_since(run_dir, 0)[0]), default=0)
            saved = newest_valid_step(run_dir)
            out = child.output()
            r.signals.append(
                {
                    "signal": sig.name,
                    "exit": status,
                    "seconds_to_exit": round(latency, 3),
                    "step_reached": reached,
                    "checkpoint_step": saved,
                }
            )
            r.check(status == 0, f"{sig.name}: exit status {status} (None: still running after {timeout} s)")
            r.check(saved == reached, f"{sig.name}: checkpoint at step {saved}, but step {reached} was logged")
            r.check(f"{sig.name} received" in out, f"{sig.name}: no 'received' message in the output")
            r.check("Traceback" not in out, f"{sig.name}: a traceback in the output")
        child = self.start(run_dir, "signals-finish")
        r.runs_tried += 1
        r.check(child.wait(600) == 0, f"signals: the final resume failed: {child.output()[-2000:]}")
        return run_dir

    # full disk ----------------------------------------------------------------------------------

    def disk_full(self) -> Path:
        r = self.report
        run_dir = self.work / "disk_full"
        child = self.start(run_dir, "disk-full")
        r.runs_tried += 1
        while child.poll() is None and newest_valid_step(run_dir) < 3:
            time.sleep(0.005)
        if child.status is not None:
            r.check(False, f"disk full: the run ended (exit {child.status}) before the limit was set")
            return run_dir
        # Files may no longer grow past 64 KiB: metrics rows still fit, a checkpoint (~1 MB) does not.
        limit = 64 * 1024
        resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (limit, limit))
        before = newest_valid_step(run_dir)
        status = child.wait(120)
        if status is None:
            child.kill()
        out = child.output()
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        intact = newest_valid_step(run_dir)
        r.disk_full = {
            "exit": status,
            "error": errors[-1] if errors else None,
            "valid_checkpoint_step": intact,
            "valid_before_limit": before,
            "temporaries_left": temporaries(run_dir),
        }
        r.check(status == 2, f"disk full: exit status {status}, expected 2")
        r.check(len(errors) == 1 and "cannot write checkpoint" in errors[0], f"disk full: error lines {errors}")
        r.check("Traceback" not in out, "disk full: a traceback in the output")
        r.check(
            intact >= before and not invalid_steps(run_dir) and not temporaries(run_dir),
            f"disk full: checkpoints left in a bad state: {r.disk_full}",
        )
        child = self.start(run_dir, "disk-full-resume")
        r.runs_tried += 1
        r.check(child.wait(600) == 0, f"disk full: the resume failed: {child.output()[-2000:]}")
        return run_dir


# --- comparing final states (torch from here on: every child has exited) -----------------------


def _same(a: Any, b: Any) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def compare(baseline: Path, other: Path) -> list[str]:
    """What differs between two finished runs' final checkpoints and metrics ([] when nothing)."""
    import warnings

    from pkmlm.metrics.sinks import read_metrics

    a, b = final_state(baseline), final_state(other)
    diffs = [k for k in ("step", "tokens", "model", "optimizer", "data", "rng") if not _same(a[k], b[k])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torn lines are counted elsewhere
        ra, rb = read_metrics(baseline / "metrics.jsonl"), read_metrics(other / "metrics.jsonl")
    la = {r["step"]: r["train/loss"] for r in ra if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in rb if "train/loss" in r}
    if la != lb:
        diffs.append("metrics train/loss")
    va = [(r["step"], r["val/loss"]) for r in ra if "val/loss" in r]
    vb = [(r["step"], r["val/loss"]) for r in rb if "val/loss" in r]
    if va != vb:
        diffs.append("metrics val/loss")
    return diffs


def final_state(run_dir: Path) -> dict:
    """The newest valid checkpoint of `run_dir` as one dict: step, tokens, model, optimizer, data, RNG."""
    from pkmlm.checkpoint import store

    state = store.read(store.latest_valid(run_dir / "checkpoints"))
    return {
        "step": state["meta"]["step"],
        "tokens": state["meta"]["tokens"],
        "model": state["model"],
        "optimizer": state["optim"],
        "data": {k: v for k, v in state.items() if k.startswith("data/")},
        "rng": {k: v for k, v in state.items() if k.startswith("rng/")},
    }


def max_key(state: Any, key: str) -> int:
    """The largest integer under `key` anywhere in a nested state (the data state's layout may vary)."""
    if isinstance(state, dict):
        own = [state[key]] if isinstance(state.get(key), int) else []
        return max(own + [max_key(v, key) for v in state.values()], default=0)
    if isinstance(state, (list, tuple)):
        return max((max_key(v, key) for v in state), default=0)
    return 0


def format_report(r: Report) -> str:
    kinds = [c.split(":")[0] for c in r.corruptions_injected]
    inj = ", ".join(f"{k} {kinds.count(k)}" for k in CORRUPTIONS if k in kinds) or "none"
    lines = [
        f"fault injection summary: {r.steps} steps, checkpoint every {r.checkpoint_interval}, "
        f"baseline {r.baseline_s:.1f} s (start-up {r.startup_s:.1f} s)",
        f"  runs tried {r.runs_tried} | killed -9 {r.kills} ({r.kills_during_startup} during start-up) | "
        f"resumed {r.resumed}",
        f"  steps lost at kills {r.steps_lost} (max {r.max_steps_lost_per_kill} per kill) | logged steps re-run "
        f"{r.steps_rerun} | partial writes left by kills {r.partial_writes}",
        f"  corruptions injected {len(r.corruptions_injected)} ({inj}) | unusable checkpoints detected and "
        f"skipped {r.corruptions_detected} | torn metrics lines {r.torn_metric_lines} | processes outliving "
        f"their run {r.orphans_left}",
    ]
    for s in r.signals:
        lines.append(
            f"  {s['signal']}: exit {s['exit']} {s['seconds_to_exit']:.2f} s after the signal, "
            f"checkpoint at step {s['checkpoint_step']} (step reached {s['step_reached']})"
        )
    if r.disk_full:
        d = r.disk_full
        lines.append(
            f"  disk full (RLIMIT_FSIZE): exit {d['exit']}, checkpoint step {d['valid_checkpoint_step']} "
            f"intact; {d['error']}"
        )
    lines.append(
        f"  epochs crossed {r.epochs_crossed} | final state equals the uninterrupted run: "
        + ", ".join(f"{k} {'yes' if not v else 'NO: ' + ', '.join(v)}" for k, v in r.equal.items())
    )
    lines.append("  result: " + ("PASS" if not r.failures else f"FAIL ({len(r.failures)})"))
    lines.extend(f"    - {f}" for f in r.failures)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs to land before the run may finish")
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default: 60 + 2 per kill)")
    parser.add_argument(
        "--corrupt-every", type=int, default=3, help="damage the newest checkpoint after every N-th kill (0: never)"
    )
    parser.add_argument("--signal-timeout", type=float, default=60.0, help="seconds a run may take to stop")
    parser.add_argument("--scenarios", default="kills,signals,disk_full", help="comma-separated, of the default")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times and corruptions")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--corpus-docs", type=int, default=15, help="documents in the training corpus")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)

    import tempfile

    work = args.workdir or Path(tempfile.mkdtemp(prefix="pkmlm-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # before torch is imported
    os.environ.setdefault("PKMLM_CACHE_DIR", str(work / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.path.insert(0, str(PROJECT_ROOT / "src"))
    import pkmlm.cli.train  # noqa: F401  (imported once here, shared by every forked run)
    import pkmlm.train.loop  # noqa: F401
    from pkmlm.config import default_sample_dir

    steps = args.steps or 60 + 2 * args.kills
    sample = Path(default_sample_dir()) / "c4" / "c4_en_train_first1000.jsonl.gz"
    corpus = write_corpus(sample, work / "corpus.jsonl", args.corpus_docs)
    report = Report(steps=steps)
    replaced = {e.split("=", 1)[0] for e in args.extra}  # --extra wins over the tiny config (Hydra refuses duplicates)
    base = [a for a in tiny_config(corpus, steps) if a.split("=", 1)[0] not in replaced] + list(args.extra)
    harness = Harness(work, base, report, random.Random(args.seed))
    scenarios = [s for s in args.scenarios.split(",") if s]
    print(
        f"fault injection in {work}: {args.kills} kills, {steps} steps, scenarios {scenarios}, seed {args.seed}",
        flush=True,
    )

    baseline = harness.baseline()
    finished = {}
    if "kills" in scenarios:
        finished["kills"] = harness.kills(args.kills, args.corrupt_every)
    if "signals" in scenarios:
        finished["signals"] = harness.signals(args.signal_timeout)
    if "disk_full" in scenarios:
        finished["disk_full"] = harness.disk_full()

    harness.reap_orphans()
    report.check(report.orphans_left == 0, f"{report.orphans_left} processes outlived their run (orphaned workers)")
    # Every child has exited: torch may run in this process now.
    report.epochs_crossed = max_key(final_state(baseline)["data"], "epoch")
    for name, run_dir in finished.items():
        report.equal[name] = compare(baseline, run_dir)
        report.check(not report.equal[name], f"{name}: final state differs from the baseline in {report.equal[name]}")
    text = format_report(report)
    print(text, flush=True)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "workdir": str(work), "summary": text}, indent=1))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
