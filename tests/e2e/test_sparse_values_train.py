"""Sparse value gradients (`optim.sparse_values`) through the training loop: a resumed run equals an
uninterrupted one bit for bit (tests/unit/test_sparse_values.py checks the optimizer alone)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import read_rows, train_in_process

from pkmlm.checkpoint import store


def _train(run_dir: Path, *extra: str) -> dict:
    return train_in_process(run_dir, *extra)


def test_training_with_sparse_values_resumes_bitwise(tmp_path):
    steps = ["optim.sparse_values=true", "train.max_steps=5", "eval.interval=5", "checkpoint.interval=100"]
    _train(tmp_path / "straight", *steps)
    _train(tmp_path / "split", *steps, "train.stop_at_step=2")
    _train(tmp_path / "split", *steps)
    straight = {r["step"]: r["train/loss"] for r in read_rows(tmp_path / "straight") if "train/loss" in r}
    split = {r["step"]: r["train/loss"] for r in read_rows(tmp_path / "split") if "train/loss" in r}
    assert list(straight) == [1, 2, 3, 4, 5] and straight == split
    a = store.read(store.latest_valid(tmp_path / "straight" / "checkpoints"))
    b = store.read(store.latest_valid(tmp_path / "split" / "checkpoints"))
    # Both optimizers' state (AdamW's dense groups, lazy Adam's values) in the one checkpoint.
    assert [g["name"] for g in a["optim"]["param_groups"]] == ["decay", "no_decay", "memory_values"]
    assert {"exp_avg", "exp_avg_sq"} <= set(a["optim"]["state"]["blocks.1.memory.values.weight"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
