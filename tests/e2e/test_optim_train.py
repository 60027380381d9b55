"""The value-table optimisation options (`optim.values_schedule`, `optim.values_grad_clip`) through the
training loop (tests/unit/test_optim.py checks them alone)."""

from __future__ import annotations

from helpers import read_rows, train_in_process


def test_the_options_reach_the_training_loop(tmp_path):
    train_in_process(
        tmp_path / "run",
        *("train.max_steps=2", "eval.interval=100", "optim.values_schedule=constant", "optim.values_grad_clip=0.5"),
    )
    rows = [r for r in read_rows(tmp_path / "run") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/values_grad_norm"] > 0 and r["train/grad_norm"] > 0 for r in rows)
