"""scripts/plot_engram_allocation.py: the README's allocation figure reads its curves and the dense
reference line from the results files (nothing typed in), and says what to do without git history."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plot_engram_allocation", ROOT / "scripts" / "plot_engram_allocation.py")
allocation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(allocation)  # loaded by path: sys.path stays as it was


def test_the_curves_and_the_dense_line_come_from_the_results_files(tmp_path):
    new = json.loads((ROOT / allocation.RESULTS).read_text())
    variants = json.loads((ROOT / allocation.VARIANTS).read_text())
    shares, ppl = allocation.curve(new)
    assert shares == [0, 25, 50, 75, 100]
    at = [c if isinstance(c, str) else c["name"] for c in new["columns"]].index("final val ppl")
    assert ppl == [row[at] for row in new["rows"]]
    dense = allocation.dense_ppl(variants)
    assert variants["rows"][0][0].startswith("dense") and dense == variants["rows"][0][4]
    # the README's sentence on this table compares with the same dense run (ppl x dense column)
    ratio = [c if isinstance(c, str) else c["name"] for c in new["columns"]].index("ppl × dense")
    assert all(row[ratio] == pytest.approx(row[at] / dense, rel=1e-6) for row in new["rows"])
    allocation.plot(new, new, dense, tmp_path / "allocation.png")
    assert (tmp_path / "allocation.png").read_bytes()[:4] == b"\x89PNG"


def test_without_the_old_commit_or_a_dense_row_it_stops_with_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="run it in a clone with the repository's history") as stop:
        allocation.old_results(tmp_path)  # not a git repository
    assert "\n" not in str(stop.value)
    variants = json.loads((ROOT / allocation.VARIANTS).read_text())
    variants["rows"] = [row for row in variants["rows"] if not row[0].startswith("dense")]
    with pytest.raises(SystemExit, match="has no dense row"):
        allocation.dense_ppl(variants)
