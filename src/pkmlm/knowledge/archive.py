"""The knowledge sweep's run archive: what a finished run left that the report needs, in one file
that outlives the sweep directory.

A sweep directory holds hours of training per run, and everything in it lives on one machine's
disk: when that machine is lost (a reset, a new sandbox, a disk wiped), a plain resume starts every
run again. The report, though, needs none of the checkpoints once a run is finished and scored: it
reads the run's per-checkpoint recall rows (`<run>/sweep_recall.jsonl`), the memory usage measured
on its questions (`<run>/sweep_usage.jsonl`), the commit it was trained at, and the sweep's
reference step times (`step_times.json`). `--archive FILE` keeps exactly those, for every finished
run, in FILE (a few kB per run: small enough to commit beside the results it backs), and a sweep
started with the same arguments on an empty or partial directory *restores* each finished run from
it instead of training it again: its two caches are written back into its run directory with an
`archived.json` marker, and the run counts as finished (`restored`).

A run is restored only into a run directory without checkpoints of its own (a run half-trained here
is resumed, not overwritten) and only where the archived run is the one the sweep plans: the same
arm, N and seed, `max_steps`, equal-exposure steps, tokens per biography and biographies' share, and
the same training arguments once the sweep directory's path and the interpreter are set aside
(`PLAN_KEYS`, `_portable`: a run archived from one checkout restores into another). Otherwise it is
trained again, said so, and what an earlier restore wrote there is moved aside (`*.superseded`), so
that the new run's rows are its own. The archive is JSON lines, one object per line: `{"kind":
"step_times", ...}` (the sweep's `step_times.json` as it was) and `{"kind": "run", ...}` per run,
sorted; a write holds a lock (`FILE.lock`, `fcntl.flock`) while it re-reads the file and merges (a
run archived by another sitting or a report meanwhile is kept), then writes it whole to a temporary
file renamed over the old one (a sweep killed while writing leaves the old archive). The sweep
writes it after each N's evaluation and at the end of a sitting. A restored run's marker holds the
plan it was restored for: a later sitting that plans the run otherwise (with or without --archive)
does not take it for finished.
An edited archive that no longer parses or lacks what a restore needs is refused, naming the line,
before any training starts.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pkmlm.checkpoint.files import atomic_write
from pkmlm.knowledge.step_time import load_step_times

MARKER = "archived.json"  # in a restored run directory: where its rows came from, and its commit
RECALL_CACHE, USAGE_CACHE = "sweep_recall.jsonl", "sweep_usage.jsonl"  # sweep.evaluate_cached's, question_usage's
RUN_KEYS = {
    **{"run": str, "arm": str, "people": int, "seed": int, "max_steps": int, "steps_equal": int},
    **{"train_args": list, "recall": list},
}
# what must equal the plan's for a restore (the exposures of a row are its tokens over these two)
PLAN_KEYS = ("arm", "people", "seed", "max_steps", "steps_equal", "tokens_per_bio", "bios_share")
ROW_NUMBERS = ("tokens", "recall/bits")  # besides `step`: what the report reads of every row
LOCK_WAIT_S = 60  # a write takes milliseconds; a lock held longer is a stopped or hung writer


class Archive:
    """The runs and step times of an archive file (`read`), keyed by run directory name."""

    def __init__(self, path: Path, runs: dict[str, dict], step_times: dict | None) -> None:
        self.path, self.runs, self.step_times = Path(path), runs, step_times


def _refuse(path: Path, line: int, problem: str) -> SystemExit:
    return SystemExit(
        f"sweep: --archive {path}, line {line}: {problem}: restore the file from git "
        "(git checkout -- FILE) or pass a new --archive path"
    )


def read(path: Path) -> Archive:
    """The archive at `path` (empty where there is no file yet), every line checked: an edited or
    truncated archive is refused with the line and what is wrong, before the sweep trains anything."""
    path = Path(path)
    runs: dict[str, dict] = {}
    step_times = None
    if not path.exists():
        return Archive(path, runs, step_times)
    if not path.is_file():
        raise SystemExit(f"sweep: --archive {path} is not a file: pass the path of a .jsonl file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(
            f"sweep: --archive {path} cannot be read ({e}): restore it from git or pass a new path"
        ) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise _refuse(path, number, f"not JSON ({e.msg})") from None
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind == "step_times":
            if not isinstance(entry.get("step_times"), dict) or not isinstance(
                entry["step_times"].get("step_ms"), dict
            ):
                raise _refuse(path, number, "a step_times line without its step_ms")
            step_times = entry["step_times"]
        elif kind == "run":
            for key, kind_of in RUN_KEYS.items():
                if not isinstance(entry.get(key), kind_of) or isinstance(entry.get(key), bool):
                    raise _refuse(path, number, f"run line without a valid {key!r}")
            for key in ("tokens_per_bio", "bios_share"):
                if not _number(entry.get(key)):
                    raise _refuse(path, number, f"run line without a valid {key!r}")
            rows = entry["recall"]
            if not all(isinstance(r, dict) and _integer(r.get("step")) for r in rows):
                raise _refuse(path, number, f"run {entry['run']}: a recall row without an integer step")
            if entry["max_steps"] not in [r["step"] for r in rows]:
                raise _refuse(
                    path, number, f"run {entry['run']} has no recall row at its final step {entry['max_steps']}"
                )
            for key in ROW_NUMBERS:
                if not all(_number(r.get(key)) for r in rows):
                    raise _refuse(path, number, f"run {entry['run']}: a recall row without a number {key!r}")
            usage = entry.get("usage", [])
            if not isinstance(usage, list) or not all(
                isinstance(u, dict) and _integer(u.get("step")) and isinstance(u.get("usage"), dict) for u in usage
            ):
                raise _refuse(path, number, f"run {entry['run']}: 'usage' is not a list of usage rows")
            if entry["run"] in runs:
                raise _refuse(path, number, f"run {entry['run']} appears twice")
            runs[entry["run"]] = entry
        else:
            raise _refuse(path, number, f"unknown kind {kind!r} (expected 'run' or 'step_times')")
    return Archive(path, runs, step_times)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _portable(command: list[str], out: Path) -> list[str]:
    """A training command with the sweep directory's path (as given, and resolved; the sweep makes
    it absolute) written `{out}` where it starts a path (after the start, `=`, `[` or `,`, before a
    `/`, `]`, `,` or the end): the same run planned under another path or on another machine
    compares equal, and nothing else in the command is touched."""
    roots = sorted({str(Path(out)), str(Path(out).resolve())}, key=len, reverse=True)
    path = re.compile(r"(?<![^=\[,])(?:" + "|".join(map(re.escape, roots)) + r")(?=[/\],]|$)")
    return [path.sub("{out}", str(arg)) for arg in command]


def planned(plan: dict) -> dict[str, Any]:
    """What a restored run must share with the plan (`PLAN_KEYS` and the portable training arguments,
    after the interpreter: any venv)."""
    return {**{k: plan[k] for k in PLAN_KEYS}, "train_args": _portable(plan["command"][1:], _sweep_dir(plan))}


def _sweep_dir(plan: dict) -> Path:
    return Path(plan["run_dir"]).parent.parent  # DIR/runs/<run>


def cache_rows(path: Path) -> list[dict]:
    """The rows of a run's JSON-lines cache (`RECALL_CACHE`, `USAGE_CACHE`) that hold an integer
    `step`, in file order; [] where there is no file. A line that does not parse (the torn last line
    of a killed writer, an edit, bytes that are not UTF-8) is skipped: what it held is measured again."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and _integer(row.get("step")):
            rows.append(row)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a run's JSON-lines cache, on a line of their own after a torn last line."""
    path = Path(path)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write("\n" * torn + "".join(json.dumps(row) + "\n" for row in rows))


def code_version_of(run_dir: Path) -> dict | None:
    """The code version (`pkmlm.train.rundir.code_version`) the run was trained at: its last
    checkpoint's, or the archive marker's for a restored run; None where neither is readable."""
    versions = code_versions_of(run_dir)
    return versions[0] if versions else None


def code_versions_of(run_dir: Path) -> list[dict]:
    """Every code version behind the run's rows: its last checkpoint's, then its archive marker's
    where it has one (a restored run trained again here for its decayed branches, decay.py, has
    both: its archived rows from the one, its checkpoints from the other); the readable ones."""
    from pkmlm.checkpoint.store import list_checkpoints

    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    versions = []
    for source in ([checkpoints[-1] / "meta.json"] if checkpoints else []) + [run_dir / MARKER]:
        try:
            version = json.loads(source.read_text())["code_version"]
            if isinstance(version, dict) and version.get("commit") and version not in versions:
                versions.append(version)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return versions


def finished(plan: dict) -> bool:
    """Whether the plan's run is finished: trained to its `max_steps` here (that checkpoint complete),
    or restored from an archive for this plan (`restored`)."""
    from pkmlm.checkpoint.store import checkpoint_path

    final = checkpoint_path(Path(plan["run_dir"]) / "checkpoints", plan["max_steps"])
    return (final / ".metadata").is_file() or restored(plan)


def record_of(plan: dict) -> dict[str, Any] | None:
    """The archive line of a plan's run where it is `finished` and evaluated (its final
    checkpoint's recall row cached); None otherwise. Usage rows name their questions file portably
    (`{out}/...`)."""
    run_dir, out = Path(plan["run_dir"]), _sweep_dir(plan)
    recall = sorted(cache_rows(run_dir / RECALL_CACHE), key=lambda row: row["step"])
    if plan["max_steps"] not in {row["step"] for row in recall} or not finished(plan):
        return None
    usage = cache_rows(run_dir / USAGE_CACHE)
    usage = [{**row, "qa": _portable([row["qa"]], out)[0]} if "qa" in row else row for row in usage]
    return {
        "kind": "run",
        "run": run_dir.name,
        **planned(plan),
        "code_version": code_version_of(run_dir),
        "recall": recall,
        "usage": usage,
    }


def write(archive: Archive, plans: list[dict], out: Path) -> int:
    """Add the plans' finished, evaluated runs (`record_of`) and the sweep's step times to the archive
    file, keeping its runs that are not among them (runs of other levels, of a lost directory,
    archived by another sitting since this one read it: the file is read again here, under the
    lock); written whole, then renamed over the old file. Returns the number of runs in it."""
    archive.path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(archive.path):
        on_disk = read(archive.path)
        runs = {**archive.runs, **on_disk.runs}
        for plan in plans:
            record = record_of(plan)
            if record is not None:
                runs[record["run"]] = record
        step_times = load_step_times(out) or on_disk.step_times or archive.step_times
        lines = [{"kind": "step_times", "step_times": step_times}] if step_times else []
        lines += [runs[name] for name in sorted(runs)]
        atomic_write(archive.path, "".join(json.dumps(line) + "\n" for line in lines).encode())
    archive.runs, archive.step_times = runs, step_times
    return len(runs)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """`FILE.lock` beside the archive held (filelock: `fcntl.flock`, as the run directory's lock),
    waited for up to `LOCK_WAIT_S`, then refused naming the lock (a writer stopped while it held it,
    e.g. a sweep paused with SIGSTOP)."""
    from filelock import FileLock, Timeout

    lock = path.with_name(path.name + ".lock")
    try:
        with FileLock(lock, timeout=LOCK_WAIT_S):
            yield
    except Timeout:
        raise SystemExit(
            f"sweep: --archive {path}: another process has held {lock} for {LOCK_WAIT_S} s: "
            "let it finish (a paused sweep: continue it) and run again"
        ) from None


def restored(plan: dict) -> bool:
    """Whether the plan's run was restored from an archive for this very plan (its marker says so)."""
    try:
        marker = json.loads((Path(plan["run_dir"]) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("plan") == planned(plan)


def restore(archive: Archive, plan: dict) -> tuple[bool, str | None]:
    """Restore the plan's run from the archive where it can be (see the module's docstring): writes
    its recall and usage caches and the marker into its run directory. Returns whether it restored
    the run, and a note where the archive holds the run but it was not restored (None otherwise)."""
    from pkmlm.checkpoint.store import list_checkpoints

    run_dir = Path(plan["run_dir"])
    record = archive.runs.get(run_dir.name)
    if record is None or finished(plan):
        return False, None
    if list_checkpoints(run_dir / "checkpoints"):  # begun here: this directory's own run
        return False, f"{run_dir.name}: has checkpoints of its own here: resumed, not restored from the archive"
    want = planned(plan)
    changed = [f"{k} {record[k]} (archived) vs {want[k]}" for k in PLAN_KEYS if record[k] != want[k]]
    changed += ["its training command"] * (record["train_args"] != want["train_args"])
    if changed:
        aside = _set_aside(run_dir) if (run_dir / MARKER).is_file() else []
        moved = f"; {', '.join(aside)} of an earlier restore moved aside (*.superseded)" if aside else ""
        differs = ", ".join(changed)
        return False, f"{run_dir.name}: the archived run differs from the planned one ({differs}): trained again{moved}"
    run_dir.mkdir(parents=True, exist_ok=True)
    _set_aside(run_dir)  # caches of a run begun here and never checkpointed, an earlier plan's restore
    (run_dir / RECALL_CACHE).write_text("".join(json.dumps(row) + "\n" for row in record["recall"]))
    # usage rows name the questions file they were measured on (sweep_report.question_usage): this
    # sweep directory's copy of the same corpus, wherever it lives now
    qa = str(Path(plan["facts"]) / "qa.jsonl")
    usage = [{**row, "qa": qa} for row in record.get("usage", [])]
    if usage:
        (run_dir / USAGE_CACHE).write_text("".join(json.dumps(row) + "\n" for row in usage))
    marker = {"archive": str(archive.path), "plan": want, "code_version": record.get("code_version")}
    (run_dir / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return True, None


def _set_aside(run_dir: Path) -> list[str]:
    """Rename a run directory's recall and usage caches and archive marker to `*.superseded` (an
    earlier one of that name replaced): kept, but no longer this run's. Returns the names moved."""
    moved = []
    for name in (MARKER, RECALL_CACHE, USAGE_CACHE):
        path = Path(run_dir) / name
        if path.is_file():
            os.replace(path, path.with_name(name + ".superseded"))
            moved.append(name)
    return moved


def restore_step_times(archive: Archive, out: Path) -> bool:
    """Write the archived step times as the sweep directory's, where it has none (the restored
    runs' reference clock stays the one they were compared on). Returns whether it did."""
    from pkmlm.knowledge.step_time import STEP_TIMES

    path = Path(out) / STEP_TIMES
    if archive.step_times is None or path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(archive.step_times, indent=1) + "\n")
    return True
