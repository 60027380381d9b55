"""End to end through the console entry points, in subprocesses: a short training run writes the
run directory and metrics.jsonl with the contract keys; pkmlm-eval reads it back and writes
nothing; user errors are one line on stderr with exit status 2."""

from __future__ import annotations

import json

import pytest
from conftest import C4
from helpers import TINY, overrides, read_rows, run_cli

CONTRACT_TRAIN = {"step", "tokens", "train/loss", "train/lr", "train/tokens_per_s"}
CONTRACT_VAL = {"val/loss", "val/ppl", "memory/layer1/usage", "memory/layer1/kl_weight", "memory/layer1/kl_count"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("pkmlm.cli.train", [*TINY, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_train_writes_run_directory(trained_run):
    run_dir, proc = trained_run
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000003.dcp",
        "step_00000006.dcp",
    ]
    assert str(run_dir) in proc.stdout  # the summary says where the run is


def test_metrics_rows_carry_contract_keys(trained_run):
    run_dir, _ = trained_run
    rows = read_rows(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    val_rows = [r for r in rows if "val/ppl" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]  # logging.interval=1, first update = 1
    assert all(CONTRACT_TRAIN <= r.keys() for r in train_rows)
    assert [r["step"] for r in val_rows] == [3, 6]
    for r in val_rows:
        assert CONTRACT_VAL <= r.keys()  # memory metrics in the same row as val/ppl
        assert 0 < r["memory/layer1/usage"] <= 1
        assert r["memory/layer1/kl_weight"] >= 0 and r["memory/layer1/kl_count"] >= 0
    assert train_rows[-1]["tokens"] == 6 * 4 * 32


def test_eval_cli_prints_contract_json_and_writes_nothing(trained_run):
    run_dir, _ = trained_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    proc = run_cli(
        "pkmlm.cli.eval", [f"checkpoint={run_dir}", f"data.files=[{C4}]", "max_batches=3"], cwd=run_dir.parent
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] > 0 and out["ppl"] > 1 and out["bpb"] > 0
    assert {"memory/layer1/usage", "memory/layer1/kl_weight", "memory/layer1/kl_count"} <= out.keys()
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.no_such_key=1", "no_such_key"),
        ("model.memory.knn=1000", "model.memory.knn"),
        ("data.files=[/no/such/dir/*.jsonl]", "/no/such/dir/*.jsonl"),
        ("model.memory.layers=[7]", "model.memory.layers"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, override, needle):
    proc = run_cli(
        "pkmlm.cli.train", [*overrides(override), f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr


def test_eval_on_a_file_without_documents_is_one_line(trained_run, tmp_path):
    # Was: exit 0 with "tokens": 0 and "ppl": null, no message.
    run_dir, _ = trained_run
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    proc = run_cli("pkmlm.cli.eval", [f"checkpoint={run_dir}", f"data.files=[{empty}]"], cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "no document to evaluate" in lines[0] and str(empty) in lines[0] and not proc.stdout.strip()
