"""Sweeps end to end through the console entry points, and pkmlm-compare on their run directories.

A 2-job memory-position sweep (`pkmlm-train -m experiment=tiny/mem4 model.memory.layers=[0],[1]`)
and a 2-arm compare group each land in one sweep directory with one run directory per job;
pkmlm-compare turns them into table.md, table.csv and PNG plots whose numbers are the runs' own;
pkmlm-eval reports per-head statistics for a sweep's run.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from conftest import C4
from helpers import TINY, eval_in_process, read_rows, run_cli

from pkmlm.cli.compare import main as compare_main

# TINY without the model's depth and memory layers: those are what the experiments choose.
SMALL = [o for o in TINY if not o.startswith(("model.n_layers=", "model.memory.layers="))]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep_dirs(root):
    return sorted(p.parent for p in root.glob("multirun/**/multirun.yaml"))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    position = run_cli(
        "pkmlm.cli.train", ["-m", "experiment=tiny/mem4", "model.memory.layers=[0],[1]", *SMALL], cwd=root
    )
    assert position.returncode == 0, position.stderr[-3000:]
    # A compare group, cut to two arms (a command-line sweep replaces the preset's list).
    arms = run_cli(
        "pkmlm.cli.train", ["experiment=compare/tiny_mem_vs_dense", "+experiment/tiny=dense8,mem4", *SMALL], cwd=root
    )
    assert arms.returncode == 0, arms.stderr[-3000:]
    dirs = _sweep_dirs(root)
    assert len(dirs) == 2, dirs
    compare_dir = next(d for d in dirs if "compare" in str(d))
    position_dir = next(d for d in dirs if d != compare_dir)
    return root, position_dir, compare_dir


def test_each_sweep_is_one_directory_with_a_run_per_job(sweeps):
    root, position_dir, compare_dir = sweeps
    assert position_dir.relative_to(root).parts[:3] == ("multirun", "tiny", "mem4")
    # The arms rename themselves (tiny/dense8, tiny/mem4) yet stay in the group's sweep directory.
    assert compare_dir.relative_to(root).parts[:3] == ("multirun", "compare", "tiny_mem_vs_dense")
    for sweep_dir, expected in ((position_dir, [[0], [1]]), (compare_dir, [[], [2]])):
        jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
        assert [p.name for p in jobs] == ["0", "1"]
        layers = []
        for job in jobs:
            config = yaml.safe_load((job / "config.yaml").read_text())
            layers.append(config["model"]["memory"]["layers"])
            # One wandb group per sweep: its directory.
            assert config["logging"]["wandb"]["group"] == str(sweep_dir.relative_to(root))
            assert read_rows(job)[-1]["stopped_by"] == "max_steps"
        assert layers == expected
    names = [yaml.safe_load((compare_dir / j / "config.yaml").read_text())["name"] for j in ("0", "1")]
    assert names == ["tiny/dense8", "tiny/mem4"]


def test_compare_writes_table_csv_and_plots_from_the_runs(sweeps, tmp_path):
    root, position_dir, compare_dir = sweeps
    out = tmp_path / "report"
    proc = run_cli("pkmlm.cli.compare", [str(position_dir), str(compare_dir), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown = (out / "table.md").read_text()
    assert proc.stdout == markdown
    for label in ("model.memory.layers=[0]", "model.memory.layers=[1]", "tiny/dense8", "tiny/mem4"):
        assert label in markdown
    assert "(baseline)" in markdown and "Matched: all 4 runs" in markdown
    for name in ("ppl_vs_tokens.png", "ppl_vs_time.png", "by_layer.png"):  # by_layer: a position sweep
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [
        "model.memory.layers=[0]",
        "model.memory.layers=[1]",
        "tiny/dense8",
        "tiny/mem4",
    ]
    run_dirs = [position_dir / "0", position_dir / "1", compare_dir / "0", compare_dir / "1"]
    for row, run_dir in zip(rows, run_dirs):
        metrics = read_rows(run_dir)
        final = metrics[-1]
        val = [m for m in metrics if "val/ppl" in m]
        assert int(row["tokens"]) == final["tokens"] == 6 * 4 * 32 and int(row["steps"]) == 6
        assert float(row["final_val_ppl"]) == pytest.approx(val[-1]["val/ppl"])
        assert float(row["best_val_ppl"]) == pytest.approx(min(m["val/ppl"] for m in val))
        assert float(row["wall_time_s"]) == pytest.approx(final["wall_time_s"])
        assert float(row["tokens_per_s"]) == pytest.approx(final["tokens"] / final["train_time_s"])
        assert int(row["params_total"]) == final["params_total"]
        assert int(row["params_active"]) == final["params_active"]
        for layer in yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["memory"]["layers"]:
            assert float(row[f"memory/layer{layer}/usage"]) == pytest.approx(val[-1][f"memory/layer{layer}/usage"])
            assert float(row[f"memory/layer{layer}/kl_weight"]) == pytest.approx(
                val[-1][f"memory/layer{layer}/kl_weight"]
            )
    assert float(rows[0]["speed_vs_baseline"]) == 1.0 and float(rows[0]["ppl_vs_baseline"]) == 1.0
    assert float(rows[3]["ppl_vs_baseline"]) == pytest.approx(
        float(rows[3]["final_val_ppl"]) / float(rows[0]["final_val_ppl"])
    )
    assert [r["memory_layers"] for r in rows] == ["0", "1", "", "2"]


def test_compare_baseline_by_label_and_mismatch_is_reported(sweeps, tmp_path, capsys):
    root, position_dir, compare_dir = sweeps
    out = tmp_path / "report"
    compare_main([str(compare_dir), "--baseline", "tiny/mem4", "--out", str(out)])
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["baseline"] == "True" and float(rows[1]["ppl_vs_baseline"]) == 1.0
    assert not (out / "by_layer.png").exists()  # one memory position only: no position plot
    # A run with another seed is not matched, and the table says in what.
    config_path = compare_dir / "1" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 7}))
    (copy / "metrics.jsonl").write_text((compare_dir / "1" / "metrics.jsonl").read_text())
    capsys.readouterr()
    compare_main([str(compare_dir / "0"), str(copy), "--out", str(out)])
    assert "differs: `seed`" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/no/such/run"], "/no/such/run"),
        (["{empty}"], "holds no run directory"),
        (["{sweep}", "--baseline", "nope"], "--baseline='nope'"),
        ([], "required: DIR"),
    ],
)
def test_compare_user_errors_are_one_line_exit_2(sweeps, tmp_path, capsys, args, needle):
    root, position_dir, _ = sweeps
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", sweep=position_dir) for a in args]
    with pytest.raises(SystemExit) as exit_:
        compare_main([*args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_eval_reports_both_kls_gini_and_top_counts_per_head(sweeps):
    _, position_dir, _ = sweeps
    run_dir = position_dir / "1"
    out = eval_in_process(f"checkpoint={run_dir}", f"data.files=[{C4}]", "max_batches=2")  # pkmlm-eval's numbers
    assert out["bpb"] > 0 and out["ppl"] > 1
    stats = ("usage", "kl_weight", "kl_count", "gini", "top50", "top90", "top99")
    for prefix in ["memory/layer1/"] + [f"memory/layer1/head{h}/" for h in range(2)]:  # TINY: 2 heads
        for stat in stats:
            assert isinstance(out[prefix + stat], (int, float)) and math.isfinite(out[prefix + stat]), prefix + stat
        assert out[prefix + "top50"] <= out[prefix + "top90"] <= out[prefix + "top99"]


def test_a_run_without_its_final_row_is_counted_from_its_config(sweeps, tmp_path):
    # A run still going (or killed) has no final row: its size and FLOPs come from its config, the
    # model built on the meta device, and must equal what the finished run reported.
    from pkmlm.experiments.runs import summarise

    _, position_dir, _ = sweeps
    source = position_dir / "1"
    lines = (source / "metrics.jsonl").read_text().splitlines()
    final = json.loads(lines[-1])
    assert "stopped_by" in final
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text((source / "config.yaml").read_text())
    (partial / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    s = summarise(partial, "partial")
    assert (s.params_total, s.params_active) == (final["params_total"], final["params_active"])
    assert s.flops_per_token == final["flops_per_token"]
    assert s.stopped_by is None and s.tokens == final["tokens"]
