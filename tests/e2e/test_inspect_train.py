"""`pkmlm-inspect` end to end on a short trained run (tests/unit/test_inspect.py checks the counts and
the report on hand-made models)."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli, train_in_process


@pytest.mark.slow
def test_pkmlm_inspect_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, "checkpoint.keep_last=3")
    out = tmp_path / "report"
    done = run_cli("pkmlm.cli.inspect", [str(run_dir), "--out", str(out), "--top", "3", "--random", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "report.md").is_file() and (out / "layer1.md").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [p["step"] for p in summary["history"]] == [3, 6]  # one point per checkpoint kept
    assert summary["source"]["step"] == 6 and len(summary["layers"]["1"]["most_read"]) == 3
    # the newest checkpoint's point is the report's own numbers (same data, same model)
    assert summary["history"][-1]["layers"]["1"]["usage"] == summary["layers"]["1"]["stats"]["usage"]
    bad = run_cli("pkmlm.cli.inspect", [str(run_dir), "--out", str(out), "--contexts", "0"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--contexts" in bad.stderr
