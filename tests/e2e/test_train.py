"""The training loop in-process: resume equality (bitwise on CPU), stop_at_step, schedules and
optimizer groups, checkpoint verification, refusing a foreign run directory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import read_rows, train_in_process

from pkmlm.checkpoint import store
from pkmlm.config import OptimConfig, register_configs
from pkmlm.errors import UserError
from pkmlm.optim import lr_factor

register_configs()


def _train(run_dir: Path, *extra: str) -> dict:
    return train_in_process(run_dir, *extra)


def _final_state(run_dir: Path) -> dict:
    state = store.read(store.latest_valid(run_dir / "checkpoints"))
    return {**state["meta"], "model": state["model"]}


def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    steps = ["train.max_steps=8", "eval.interval=4", "checkpoint.interval=100"]
    _train(tmp_path / "straight", *steps)
    _train(tmp_path / "split", *steps, "train.stop_at_step=3")  # stops mid-epoch, mid-schedule
    _train(tmp_path / "split", *steps)  # resume=auto picks up step 3
    straight = {r["step"]: r["train/loss"] for r in read_rows(tmp_path / "straight") if "train/loss" in r}
    split = {r["step"]: r["train/loss"] for r in read_rows(tmp_path / "split") if "train/loss" in r}
    assert list(straight) == list(range(1, 9)) and straight == split  # float equality: bitwise
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "split")
    assert a["step"] == b["step"] == 8 and a["tokens"] == b["tokens"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    val_a = [r for r in read_rows(tmp_path / "straight") if "val/ppl" in r][-1]
    val_b = [r for r in read_rows(tmp_path / "split") if "val/ppl" in r][-1]
    assert val_a["val/ppl"] == val_b["val/ppl"]
    assert val_a["memory/layer1/usage"] == val_b["memory/layer1/usage"]


def test_resume_refuses_a_different_config(tmp_path):
    _train(tmp_path / "run", "train.max_steps=2")
    with pytest.raises(UserError, match="model.dim"):
        _train(tmp_path / "run", "train.max_steps=4", "model.dim=32")


def test_loss_falls_on_real_text(tmp_path):
    summary = _train(tmp_path / "run", "train.max_steps=30", "eval.interval=15", "optim.lr=1e-2")
    vals = [r["val/loss"] for r in read_rows(tmp_path / "run") if "val/loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert math.isfinite(summary["val/ppl"])


def test_lr_schedules():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    inv = OptimConfig(warmup_steps=16, schedule="inv_sqrt")
    assert lr_factor(15, 100, inv) == pytest.approx(1.0) and lr_factor(63, 100, inv) == pytest.approx(0.5)
    assert lr_factor(50, 100, OptimConfig(warmup_steps=0, schedule="constant")) == 1.0


def test_optimizer_groups_give_values_their_own_lr_and_no_decay():
    from pkmlm.model.memory import MemoryConfig
    from pkmlm.model.transformer import ModelConfig, Transformer
    from pkmlm.optim import param_groups

    model = Transformer(
        ModelConfig(
            vocab_size=128,
            n_layers=2,
            dim=32,
            n_heads=2,
            memory=MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=8),
        )
    )
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=3e-3, values_lr=1e-3, weight_decay=0.1))}
    values = model.memory_layers()[1].values.weight
    assert [id(p) for p in groups["memory_values"]["params"]] == [id(values)]
    assert groups["memory_values"]["lr"] == 1e-3 and groups["memory_values"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert any(p is model.memory_layers()[1].keys for p in groups["no_decay"]["params"])
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len({id(p) for p in model.parameters()})  # every parameter once (tied ones too)


def test_checkpoint_corruption_is_detected_and_skipped(tmp_path):
    for step in (1, 2, 3):
        store.write(
            tmp_path, step, {"meta": {"tokens": 0}, "model": {"w": torch.full((64,), float(step))}}, keep_last=2
        )
    assert [p.name for p in store.list_checkpoints(tmp_path)] == ["step_00000002.dcp", "step_00000003.dcp"]
    newest = next((tmp_path / "step_00000003.dcp").glob("*.distcp"))
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated
    with pytest.warns(UserWarning, match="step_00000003"):
        path = store.latest_valid(tmp_path)
    assert store.read(path)["meta"]["step"] == 2
