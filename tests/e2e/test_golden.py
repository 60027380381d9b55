"""Golden runs (issue 20): the first 20 steps of `make train` and of Memory+ reproduce the numbers
recorded in tests/golden/*.json — exactly on the recorded platform (torch, threads, CPU kernels,
tokenizers), within scripts/golden.py's TOLERANCE elsewhere. When a change moves them on purpose,
re-record (`python scripts/golden.py --record`) and update the README's numbers in the same commit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import golden  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")  # one tokenizer cache for both runs, trained by the first


@pytest.mark.parametrize("name", list(golden.RUNS))
def test_golden_run(name, workdir):
    got = golden.run(name, workdir)
    _, diffs = golden.check(name, got, golden.platform())
    assert not diffs, "\n".join(diffs[:8]) + f"\n{golden.RECORD_HINT}"


NUMBERS = {  # a golden run's numbers, made up (compare and check see only their shape and values)
    "overrides": ["a=1"],
    "train_loss": {"5": 8.0},
    "grad_norm": {"5": 1.0},
    "val_loss": 6.0,
    "val_ppl": 403.4,
    "memory": {"memory/layer2/usage": 0.3},
}


def test_compare_is_exact_on_the_recorded_platform_and_tolerant_elsewhere():
    here = golden.platform()
    numbers = dict(NUMBERS)
    recorded = {"platform": here, **numbers}
    nudged = {**numbers, "train_loss": {"5": 8.0 * (1 + golden.TOLERANCE["train_loss"] / 10)}}
    assert golden.compare("x", numbers, recorded, here) == []
    assert golden.compare("x", nudged, recorded, here) != []  # one ulp-level change fails on this platform
    other = {**here, "threads": here["threads"] + 1}
    assert golden.compare("x", nudged, recorded, other) == []  # ...and passes within tolerance elsewhere
    moved = {**numbers, "val_loss": 6.0 * (1 + 2 * golden.TOLERANCE["val_loss"])}
    assert golden.compare("x", moved, recorded, other) != []
    assert golden.compare("x", {**numbers, "overrides": ["a=2"]}, recorded, here) != []


def test_each_recorded_platform_is_checked_exactly_and_the_closest_record_elsewhere(monkeypatch):
    here = golden.platform()
    numbers = dict(NUMBERS)
    other = {**here, "cpu_capability": "another"}
    far = {**numbers, "train_loss": {"5": 9.0}}
    mine = {"platform": here, **numbers}
    monkeypatch.setattr(golden, "records", lambda name: [{"platform": other, **far}, mine])
    assert golden.check("x", numbers, here) == (mine, [])
    nudged = {**numbers, "train_loss": {"5": 8.0 * (1 + golden.TOLERANCE["train_loss"] / 10)}}
    assert golden.check("x", nudged, here)[1] != []  # this platform's record: exact, not the tolerance
    close = {"platform": other, **numbers}
    monkeypatch.setattr(golden, "records", lambda name: [{"platform": other, **far}, close])
    assert golden.check("x", nudged, here) == (close, [])  # no record of this platform: the closest, within tolerance
    # The closest is judged by its numbers among records of the same overrides: a record of other
    # overrides (one line of differences) does not win over one of the same overrides that is off in
    # two numbers, and the differences reported are that record's.
    two_off = {"platform": other, **numbers, "val_loss": 7.0, "val_ppl": 500.0}
    overrides = {"platform": other, **numbers, "overrides": ["a=2"]}
    monkeypatch.setattr(golden, "records", lambda name: [overrides, two_off])
    record, diffs = golden.check("x", numbers, here)
    assert record is two_off and len(diffs) == 2 and all("val_" in d for d in diffs)
    monkeypatch.setattr(golden, "records", lambda name: [])
    assert golden.check("x", numbers, here)[0] is None
    assert "record one with" in golden.check("x", numbers, here)[1][0]


def test_each_platform_records_in_its_own_file(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    here = golden.platform()
    assert golden.record_path("default", here) == tmp_path / "default.json"  # no record yet
    (tmp_path / "default.json").write_text(json.dumps({"platform": here}))
    assert golden.record_path("default", here) == tmp_path / "default.json"  # this platform's
    other = {**here, "cpu_capability": "OTHER", "threads": 3}
    assert golden.record_path("default", other) == tmp_path / "default@OTHER-3t.json"


def test_golden_main_without_a_record_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    monkeypatch.setattr(golden, "run", lambda name, workdir: dict(NUMBERS))
    assert golden.main(["--runs", "default"]) == 1
    assert "no record in" in capsys.readouterr().out
