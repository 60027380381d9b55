"""Every measured table of README.md and docs/benchmarks.md is rendered from docs/results/ (issue 20):
the documents equal what pkmlm.results renders, each results file carries its provenance, and no
table outside a results block goes without saying why it is not a measurement."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pkmlm import results

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", results.DOCUMENTS)
def test_documents_equal_their_rendering(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    rendered = results.render_document(text, str(ROOT / "docs" / "results"), os.path.dirname(doc))
    assert rendered == text, f"{doc} differs from docs/results/: a table was edited by hand; run `make results`"


@pytest.mark.parametrize("doc", results.DOCUMENTS)
def test_every_table_is_a_result_or_says_why_not(doc):
    unmarked = results.unmarked_tables((ROOT / doc).read_text(encoding="utf-8"))
    assert not unmarked, (
        f"{doc}: tables outside a results block with no `<!-- not-measured: why -->` line above them: {unmarked}"
    )


def test_every_results_file_is_rendered_and_valid():
    names = set(results.referenced(str(ROOT)))
    on_disk = {p.stem for p in (ROOT / "docs" / "results").glob("*.json")}
    assert on_disk - names == set(), f"results files no document renders: {sorted(on_disk - names)}"
    for name in on_disk:
        r = results.load(str(ROOT / "docs" / "results" / f"{name}.json"))
        assert len(r.commit) >= 7 and all(c in "0123456789abcdef" for c in r.commit), (name, r.commit)


def _write(tmp_path, **over):
    data = {
        "command": "pkmlm-train",
        "commit": "0123abcd",
        "date": "2026-12-06",
        "machine": "2-core CPU",
        "torch": "2.13.0+cpu",
        "threads": 2,
        "load": "quiet",
        "columns": ["step", {"name": "val ppl", "format": ".1f"}, {"name": "tokens", "format": ","}],
        "rows": [[200, 677.24, 409600], ["600", [386.51, 350.0], None]],
    }
    data.update(over)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return path


def test_render_formats_cells_and_names_provenance(tmp_path):
    table = results.render_table(results.load(str(_write(tmp_path))))
    lines = table.splitlines()
    assert lines[0] == "| step | val ppl | tokens |"
    assert lines[2] == "| 200 | 677.2 | 409,600 |"
    assert lines[3] == "| 600 | 386.5 / 350.0 |  |"
    assert "commit `0123abcd`" in lines[-1] and "docs/results/run.json" in lines[-1] and "`pkmlm-train`" in lines[-1]


def test_render_document_replaces_only_blocks(tmp_path):
    _write(tmp_path)
    doc = "intro\n<!-- results:run -->\nstale | 1 |\n<!-- /results:run -->\nend\n"
    out = results.render_document(doc, str(tmp_path), "docs")
    assert out.startswith("intro\n<!-- results:run -->\n| step |") and out.endswith("<!-- /results:run -->\nend\n")
    assert "](../docs/results/run.json)" in out
    assert results.render_document(out, str(tmp_path), "docs") == out


@pytest.mark.parametrize(
    "over, words",
    [
        ({"commit": ""}, "'commit' must be a non-empty"),
        ({"rows": [[1, 2]]}, "row 0 must be a list of 3 cells"),
        ({"columns": ["a", {"name": "b", "format": "%d"}, "c"]}, "not a Python format spec"),
        ({"threads": 1.5}, "'threads' must be"),
    ],
)
def test_bad_results_files_are_one_line_errors(tmp_path, over, words):
    with pytest.raises(results.ResultsError, match=words):
        results.load(str(_write(tmp_path, **over)))
    data = json.loads(_write(tmp_path).read_text())
    del data["load"]
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(results.ResultsError, match="missing 'load'"):
        results.load(str(tmp_path / "run.json"))


def test_unmarked_tables_found_and_excused():
    doc = "| a | b |\n|---|---|\n| 1 | 2 |\n\n<!-- not-measured: a list of presets -->\n| c |\n|---|\n"
    assert results.unmarked_tables(doc) == ["| a | b |"]
    assert results.unmarked_tables("```\n| a |\n|---|\n```\n") == []
