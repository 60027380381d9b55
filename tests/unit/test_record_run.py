"""scripts/record_run.py: training runs -> a results file, refusing numbers that belong to no commit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pkmlm import results

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import record_run  # noqa: E402

HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
pytestmark = pytest.mark.skipif(not HEAD, reason="needs the project's git checkout")


def _run(tmp_path: Path, name: str, **version) -> Path:
    run = tmp_path / name
    ckpt = run / "checkpoints" / "step_00000004.dcp"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"code_version": {"commit": HEAD, "dirty": False, **version}}))
    rows = [
        {"step": 2, "train/loss": 7.0},
        {"step": 4, "val/loss": 6.0, "val/ppl": 403.43, "memory/layer2/usage": 0.25, "memory/layer2/kl_weight": 3.7},
        {"step": 4, "wall_time_s": 120.0, "train_time_s": 90.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _record(tmp_path: Path, *runs: Path, extra=()) -> dict:
    argv = [*map(str, runs), "--name", "r", "--command", "make train", "--load", "quiet"]
    argv += [a for run in runs for a in ("--label", run.name)]
    record_run.main([*argv, "--results-dir", str(tmp_path), *extra])
    return json.loads((tmp_path / "r.json").read_text())


def test_a_clean_run_becomes_a_valid_results_file(tmp_path):
    data = _record(tmp_path, _run(tmp_path, "a"))
    assert data["commit"] == HEAD[:7] and data["rows"][0][:4] == ["a", 4, 403.43, 6.0]
    assert data["rows"][0][4] == 0.25 and data["rows"][0][-1] == "2.0 / 1.5 min"
    table = results.render_table(results.load(str(tmp_path / "r.json")))
    assert "| a | 4 | 403.43 | 6.0000 | 25.0% |" in table


def test_uncommitted_training_code_is_refused_and_other_changes_are_not(tmp_path):
    with pytest.raises(SystemExit, match="uncommitted changes to src/pkmlm/model/memory.py"):
        _record(tmp_path, _run(tmp_path, "code", dirty=True, dirty_paths=["src/pkmlm/model/memory.py", "README.md"]))
    assert _record(tmp_path, _run(tmp_path, "docs", dirty=True, dirty_paths=["README.md"]))["rows"]
    old = _run(tmp_path, "old", dirty=True)  # checkpoints from before dirty_paths was recorded
    with pytest.raises(SystemExit, match="uncommitted changes"):
        _record(tmp_path, old)
    data = _record(tmp_path, old, extra=["--dirty-ok", "README.md only"])
    assert "README.md only" in data["note"]
