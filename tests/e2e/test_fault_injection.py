"""Fault injection, the short version that `make test` runs (`pytest -m faults` runs only these).

`scripts/fault_inject.py` (the long version: 100 kills by default) runs in a subprocess: a tiny
memory model trained with `checkpoint.interval=1` is killed with SIGKILL at random moments at
least 10 times and resumed with `resume=auto` each time (every third kill is followed by damaging
the newest checkpoint), and made to hit a file-size limit while writing a checkpoint. A second,
shorter pass does the kills with `data.num_workers=2`, and the stops by SIGTERM, SIGUSR1 and
SIGINT. Every run must end bitwise equal to an uninterrupted one.

The kill times are random; the seed is printed with the summary (`PKMLM_FAULT_SEED` replays the
choices, though not the timing of the machine).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

pytestmark = [pytest.mark.faults, pytest.mark.slow]

SEED = int(os.environ.get("PKMLM_FAULT_SEED", random.randrange(10**6)))


def _start(tmp_path_factory, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    work = tmp_path_factory.mktemp(name)
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "scripts" / "fault_inject.py"),
        "--workdir",
        str(work / "work"),
        "--json",
        str(work / "report.json"),
        "--seed",
        str(SEED),
        *args,
    ]
    with open(work / "stdout.txt", "w") as out, open(work / "stderr.txt", "w") as err:  # files: no pipe to fill
        return subprocess.Popen(cmd, stdout=out, stderr=err), work


def _finish(proc: subprocess.Popen, work: Path) -> dict:
    try:
        proc.wait(timeout=540)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not (work / "report.json").exists():
        stdout, stderr = ((work / name).read_text() for name in ("stdout.txt", "stderr.txt"))
        pytest.fail(f"fault_inject.py crashed (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    report = json.loads((work / "report.json").read_text())
    report["exit"] = proc.returncode
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Both passes at once: each runs its training on one thread (fault_inject.py --threads 1), so on
    a 2-core machine the two take the time of the longer one. The stop signals run in the second pass
    only (with dataloader workers: the harder case, the signal reaching the workers too), which
    balances the two passes (~12 runs each)."""
    started = [
        _start(tmp_path_factory, "faults", "--kills", "10", "--steps", "40", "--scenarios", "kills,disk_full"),
        _start(
            tmp_path_factory,
            "faults-workers",
            "--kills",
            "4",
            "--steps",
            "30",
            "--corrupt-every",
            "2",
            "--scenarios",
            "kills,signals",
            "--extra",
            "data.num_workers=2",
        ),
    ]
    return [_finish(proc, work) for proc, work in started]


@pytest.fixture(scope="module")
def report(reports):
    return reports[0]


@pytest.fixture(scope="module")
def workers_report(reports):
    return reports[1]


def test_summary_is_printed(report, workers_report, capsys):
    # Shown whatever pytest's capture mode: CI logs carry the summary.
    with capsys.disabled():
        print(
            f"\n\n[fault injection, seed {SEED}]\n{report['summary']}\n"
            f"[the same with data.num_workers=2]\n{workers_report['summary']}\n"
        )
    assert report["failures"] == [] and report["exit"] == 0
    assert workers_report["failures"] == [] and workers_report["exit"] == 0


def test_kill_minus_9_then_resume_equals_uninterrupted(report):
    assert report["kills"] >= 10
    assert report["resumed"] >= 1
    assert report["max_steps_lost_per_kill"] <= report["checkpoint_interval"]  # at most one interval
    assert report["steps_rerun"] >= report["steps_lost"]
    assert report["equal"]["kills"] == []  # model, optimizer, data, RNG, step, tokens and metrics


def test_damaged_checkpoints_are_detected_and_skipped(report):
    injected = report["corruptions_injected"]
    assert len(injected) >= 3 and {c.split(":")[0] for c in injected} >= {"truncate", "bitflip", "no_checksum"}
    # Every damaged checkpoint was reported and skipped (plus any partial writes left by kills).
    assert report["corruptions_detected"] >= len(injected)


def test_stop_signals_checkpoint_and_exit_cleanly(workers_report):
    """With dataloader workers (the second pass)."""
    report = workers_report
    assert [s["signal"] for s in report["signals"]] == ["SIGTERM", "SIGUSR1", "SIGINT"]
    for s in report["signals"]:
        assert s["exit"] == 0 and s["seconds_to_exit"] < 60
        assert s["checkpoint_step"] == s["step_reached"] > 0  # nothing lost
    assert report["equal"]["signals"] == []


def test_full_disk_keeps_the_previous_checkpoint(report):
    d = report["disk_full"]
    assert d["exit"] == 2 and d["temporaries_left"] == []
    assert d["error"].startswith("error: cannot write checkpoint") and "File too large" in d["error"]
    assert d["valid_checkpoint_step"] >= d["valid_before_limit"] >= 3
    assert report["equal"]["disk_full"] == []


def test_resume_with_dataloader_workers_equals_uninterrupted(workers_report):
    assert workers_report["kills"] >= 4
    assert workers_report["equal"] == {"kills": [], "signals": []}
    assert workers_report["epochs_crossed"] >= 1  # resumed across epoch boundaries too
