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
sorted; a write re-reads the file and merges (a run archived by another sitting meanwhile is kept),
then writes it whole to a temporary file renamed over the old one (a sweep killed while writing
leaves the old archive). The sweep writes it after each N's evaluation and at the end of a sitting.
An edited archive that no longer parses or lacks what a restore needs is refused, naming the line,
before any training starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pkmlm.knowledge.step_time import STEP_TIMES

MARKER = "archived.json"  # in a restored run directory: where its rows came from, and its commit
RECALL_CACHE, USAGE_CACHE = "sweep_recall.jsonl", "sweep_usage.jsonl"  # sweep.evaluate_cached's, question_usage's
RUN_KEYS = {"run": str, "arm": str, "people": int, "seed": int, "max_steps": int, "steps_equal": int, "recall": list}
# what must equal the plan's for a restore (the exposures of a row are its tokens over these two)
PLAN_KEYS = ("arm", "people", "seed", "max_steps", "steps_equal", "tokens_per_bio", "bios_share")
ROW_NUMBERS = ("tokens", "recall/bits")  # besides `step`: what the report reads of every row


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
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _portable(command: list[str], out: Path) -> list[str]:
    """A training command with the sweep directory's path (as given, and resolved) written `{out}`:
    the same run planned under another path or on another machine compares equal."""
    roots = sorted({str(Path(out)), str(Path(out).resolve())}, key=len, reverse=True)
    portable = []
    for arg in command:
        arg = str(arg)
        for root in roots:
            arg = arg.replace(root, "{out}")
        portable.append(arg)
    return portable


def _sweep_dir(plan: dict) -> Path:
    return Path(plan["run_dir"]).parent.parent  # DIR/runs/<run>


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed writer: measured again where it matters
    return rows


def code_version_of(run_dir: Path) -> dict | None:
    """The code version (`pkmlm.train.rundir.code_version`) the run was trained at: its last
    checkpoint's, or the archive marker's for a restored run; None where neither is readable."""
    from pkmlm.checkpoint.store import list_checkpoints

    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
    for source in ([checkpoints[-1] / "meta.json"] if checkpoints else []) + [run_dir / MARKER]:
        try:
            version = json.loads(source.read_text())["code_version"]
            if isinstance(version, dict) and version.get("commit"):
                return version
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def record_of(plan: dict, finished: bool) -> dict[str, Any] | None:
    """The archive line of a plan's run where it is `finished` (the sweep's `run_finished`) and
    evaluated (its final checkpoint's recall row cached); None otherwise."""
    run_dir = Path(plan["run_dir"])
    recall = sorted(_lines(run_dir / RECALL_CACHE), key=lambda row: row["step"])
    if not finished or plan["max_steps"] not in {row.get("step") for row in recall}:
        return None
    return {
        "kind": "run",
        "run": run_dir.name,
        **{k: plan[k] for k in PLAN_KEYS},
        "train_args": _portable(plan["command"][1:], _sweep_dir(plan)),  # after the interpreter: any venv
        "code_version": code_version_of(run_dir),
        "recall": recall,
        "usage": _lines(run_dir / USAGE_CACHE),
    }


def write(archive: Archive, plans: list[dict], out: Path, finished) -> int:
    """Add the plans' runs that are `finished(plan)` and evaluated (`record_of`) and the sweep's step
    times to the archive file, keeping its runs that are not among them (runs of other levels, of a
    lost directory, archived by another sitting since this one read it: the file is read again
    here); written whole, then renamed over the old file. Returns the number of runs in it."""
    runs = {**archive.runs, **read(archive.path).runs}
    for plan in plans:
        record = record_of(plan, finished(plan))
        if record is not None:
            runs[record["run"]] = record
    step_times = archive.step_times
    path = Path(out) / STEP_TIMES
    if path.is_file():
        try:
            step_times = json.loads(path.read_text())
        except ValueError:
            pass  # refused where the sweep reads it (step_time.load_step_times)
    lines = [{"kind": "step_times", "step_times": step_times}] if step_times else []
    lines += [runs[name] for name in sorted(runs)]
    archive.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.path.with_name(archive.path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, archive.path)
    archive.runs, archive.step_times = runs, step_times
    return len(runs)


def restored(run_dir: Path, max_steps: int) -> bool:
    """Whether the run was restored from an archive at these `max_steps` (its marker says so)."""
    try:
        return json.loads((Path(run_dir) / MARKER).read_text())["max_steps"] == max_steps
    except (OSError, ValueError, KeyError, TypeError):
        return False


def restore(archive: Archive, plan: dict) -> str | None:
    """Restore the plan's run from the archive where it can be (see the module's docstring): writes
    its recall and usage caches and the marker into its run directory. Returns why it was not
    restored where the archive holds the run (None where restored or not archived)."""
    from pkmlm.checkpoint.store import checkpoint_path

    run_dir = Path(plan["run_dir"])
    record = archive.runs.get(run_dir.name)
    trained_here = (checkpoint_path(run_dir / "checkpoints", plan["max_steps"]) / ".metadata").is_file()
    if record is None or trained_here or restored(run_dir, plan["max_steps"]):
        return None
    planned = {k: plan[k] for k in PLAN_KEYS}
    archived = {k: record[k] for k in PLAN_KEYS}
    changed = [f"{k} {archived[k]} (archived) vs {planned[k]}" for k in PLAN_KEYS if archived[k] != planned[k]]
    if "train_args" in record and record["train_args"] != _portable(plan["command"][1:], _sweep_dir(plan)):
        changed.append("its training command")
    if changed:
        aside = _set_aside(run_dir) if (run_dir / MARKER).is_file() else []
        moved = f"; {', '.join(aside)} of an earlier restore moved aside (*.superseded)" if aside else ""
        differs = ", ".join(changed)
        return f"{run_dir.name}: the archived run differs from the planned one ({differs}): trained again{moved}"
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return f"{run_dir.name}: has checkpoints of its own here: resumed, not restored from the archive"
    run_dir.mkdir(parents=True, exist_ok=True)
    _set_aside(run_dir)  # caches of a run begun here and never checkpointed: not this run's rows
    (run_dir / RECALL_CACHE).write_text("".join(json.dumps(row) + "\n" for row in record["recall"]))
    # usage rows name the questions file they were measured on (sweep_report.question_usage): this
    # sweep directory's copy of the same corpus, wherever it lives now
    qa = str(Path(plan["facts"]) / "qa.jsonl")
    usage = [{**row, "qa": qa} for row in record.get("usage", [])]
    if usage:
        (run_dir / USAGE_CACHE).write_text("".join(json.dumps(row) + "\n" for row in usage))
    marker = {
        "archive": str(archive.path),
        "max_steps": record["max_steps"],
        "code_version": record.get("code_version"),
    }
    (run_dir / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return None


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
    path = Path(out) / STEP_TIMES
    if archive.step_times is None or path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(archive.step_times, indent=1) + "\n")
    return True
