"""`train.compile=true` end to end through the training loop (CPU, inductor): the compiled run's
losses equal the eager run's, its checkpoint holds the plain model's parameter names (no
`_orig_mod.` prefix, so it loads into an uncompiled model and resumes either way), and the loop
logs the active-FLOPs throughput and MFU. The model has a product-key memory and an Engram layer
(its hashing, gather, gate and convolution compiled with the rest). (tests/e2e/test_compile.py
checks the memory layer alone, with torch and triton only, so that it also runs on a bare GPU
machine; this file needs Hydra.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import read_rows, train_in_process

from pkmlm.checkpoint import store
from pkmlm.config import register_configs

register_configs()
PEAK = 1e10  # train.peak_flops: a stand-in peak, so that MFU is logged on CPU


def _train(run_dir: Path, *extra: str) -> None:
    train_in_process(run_dir, *extra)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler on CPU"
)
def test_compiled_training_equals_eager_and_saves_plain_names(tmp_path):
    torch._dynamo.reset()
    # LayerNorm queries: behind a BatchNorm query the bias of the norm before the memory (ln2) has an
    # exactly zero gradient (BatchNorm removes any constant shift), i.e. pure float noise, which Adam
    # turns into lr-sized steps that differ between any two implementations.
    steps = (
        "train.max_steps=3",
        "eval.interval=3",
        "checkpoint.interval=3",
        f"train.peak_flops={PEAK}",
        "model.memory.query_norm=layernorm",
        "model.memory.engram_layers=[1]",  # an Engram side layer too (issue 23: compile gives eager's losses),
        "model.memory.engram_init=maxtext",  # random tables: zero ones give W_K float-noise gradients (see above)
        "model.memory.engram_heads=2",  # small tables (the defaults are 67M parameters)
        "model.memory.engram_embed_dim=16",
        "model.memory.engram_table_size=512",
    )
    _train(tmp_path / "eager", *steps)
    _train(tmp_path / "compiled", *steps, "train.compile=true")

    eager, compiled = read_rows(tmp_path / "eager"), read_rows(tmp_path / "compiled")
    for key in ("train/loss", "val/loss"):
        a = {r["step"]: r[key] for r in eager if key in r}
        b = {r["step"]: r[key] for r in compiled if key in r}
        assert a.keys() == b.keys() and a, key
        for step in a:
            assert abs(a[step] - b[step]) <= 1e-4 * max(1.0, abs(a[step])), (key, step, a[step], b[step])
    for row in (r for r in compiled if "train/loss" in r):
        assert row["train/flops_per_s"] > 0
        assert row["train/mfu"] == pytest.approx(row["train/flops_per_s"] / PEAK)

    state = store.read(store.latest_valid(tmp_path / "compiled" / "checkpoints"))
    ref_state = store.read(store.latest_valid(tmp_path / "eager" / "checkpoints"))
    assert not [k for k in state["model"] if "_orig_mod" in k]
    assert state["model"].keys() == ref_state["model"].keys()
    # Same trained weights up to float noise, which Adam's first steps (update ~ lr * sign(grad))
    # amplify for near-zero gradients: compare each tensor's relative distance, not elementwise.
    for k, v in ref_state["model"].items():
        if v.is_floating_point():
            rel = ((state["model"][k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-12)).item()
            assert rel < 1e-2, (k, rel)
