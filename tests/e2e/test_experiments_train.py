"""Budgets, the final row and the throughput keys through the training loop: a token budget and a
time budget stop the run, and wall time adds up over a resume (tests/unit/test_experiments.py checks
the presets and the budget rules alone)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import read_rows, train_in_process


def _train(run_dir: Path, *extra: str) -> dict:
    return train_in_process(run_dir, *extra)


def test_token_budget_stops_evaluates_and_accounts(tmp_path):
    # 4 x 32 = 128 tokens per step: a 300-token budget ends after step 3 of 20 (first step >= 300).
    summary = _train(
        tmp_path / "run", "train.max_steps=20", "train.max_tokens=300", "eval.interval=100", "checkpoint.interval=100"
    )
    rows = read_rows(tmp_path / "run")
    final = rows[-1]
    assert final["stopped_by"] == "max_tokens" and final["step"] == 3 and final["tokens"] == 384
    assert summary["stopped_by"] == "max_tokens" and summary["tokens"] == 384 and summary["step"] == 3
    assert 0 < final["train_time_s"] <= final["wall_time_s"]
    val = [r for r in rows if "val/ppl" in r]
    assert [r["step"] for r in val] == [3]  # the budget's stop is evaluated
    assert (tmp_path / "run" / "checkpoints" / "step_00000003.dcp").is_dir()  # the one checkpoint format
    train_rows = [r for r in rows if "train/loss" in r]
    for key in (
        "train/tokens_per_s",
        "train/step_time_s",
        "train/data_time_s",
        "train/compute_time_s",
        "train/flops_per_s",
        "train/peak_memory_gb",
        "wall_time_s",
        "train_time_s",
    ):
        assert all(isinstance(r[key], float) and r[key] >= 0 for r in train_rows), key
    for r in train_rows:
        assert r["train/step_time_s"] == pytest.approx(r["train/data_time_s"] + r["train/compute_time_s"])
        assert r["train/mfu"] is None  # CPU: no peak unless train.peak_flops says
    assert final["flops_per_token"] > 0 and final["params_active"] < final["params_total"]


def test_time_budget_and_configured_peak_give_mfu(tmp_path):
    rows_dir = tmp_path / "run"
    _train(rows_dir, "train.max_steps=20", "train.max_time=1e-6", "train.peak_flops=1e12")
    rows = read_rows(rows_dir)
    assert rows[-1]["stopped_by"] == "max_time" and rows[-1]["step"] == 1  # any step exceeds 1 µs
    row = [r for r in rows if "train/loss" in r][-1]
    assert row["train/mfu"] == pytest.approx(row["train/flops_per_s"] / 1e12)
    assert row["train/flops_per_s"] == pytest.approx(rows[-1]["flops_per_token"] * row["train/tokens_per_s"])


def test_wall_time_adds_up_over_a_resume(tmp_path):
    _train(tmp_path / "run", "train.max_steps=4", "train.stop_at_step=2")
    first = read_rows(tmp_path / "run")[-1]
    assert first["stopped_by"] == "stop_at_step"
    _train(tmp_path / "run", "train.max_steps=4")
    last = read_rows(tmp_path / "run")[-1]
    assert last["stopped_by"] == "max_steps" and last["step"] == 4
    assert last["wall_time_s"] > first["wall_time_s"] and last["train_time_s"] > first["train_time_s"]
