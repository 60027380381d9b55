"""The memory variants (issue 14) through the training loop: each preset trains to the end with its
memory metrics logged, Memory+ and PEER resume bitwise, the balance loss is added to the training
loss (micro-batches and processes included) and reaches the retrieval parameters, PEER's sharded down
vectors are refused on a process count that does not divide model.dim, and the sweep's arms carry
their papers' optimizer settings. Tiny sizes (tests/helpers.py TINY), a few steps each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import compose_config, overrides, read_rows, run_cli, train_in_process
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pkmlm.checkpoint import store
from pkmlm.cli.compare import main as compare_main
from pkmlm.config import config_dir, register_configs, validate
from pkmlm.data.loader import resolve_data
from pkmlm.errors import ConfigError
from pkmlm.experiments.report import variant_name
from pkmlm.metrics.formatting import si
from pkmlm.model import MemoryConfig, variants
from pkmlm.parallel.env import DistInfo
from pkmlm.parallel.parallelize import check_parallel_config
from pkmlm.train.loop import train_step
from pkmlm.train.setup import setup

register_configs()

# The variant presets' own knobs stay (gate, qk_norm, values_kind, sharing, balance_loss); TINY
# shrinks the sizes and puts the memory in layer 1 of 2. Two layers share the pool where a preset
# shares one.
VARIANTS = {
    "memory_plus": ("memory=memory_plus", "model.memory.layers=[0,1]"),
    "peer": ("memory=peer",),
    "ultramem": ("memory=ultramem", "model.memory.layers=[0,1]"),
}


_compose = compose_config
_train = train_in_process


def _model_state(run_dir: Path) -> dict:
    return store.read(store.latest_valid(run_dir / "checkpoints"))["model"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_trains_to_the_end_with_memory_metrics(tmp_path, variant):
    summary = _train(
        tmp_path / variant, *VARIANTS[variant], "train.max_steps=4", "eval.interval=4", "checkpoint.interval=4"
    )
    rows = read_rows(tmp_path / variant)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(isinstance(v, float) for v in losses)  # null = non-finite
    assert summary["stopped_by"] == "max_steps" and summary["step"] == 4
    val = [r for r in rows if "val/loss" in r][-1]
    layers = [0, 1] if variant != "peer" else [1]
    for i in layers:
        assert 0 < val[f"memory/layer{i}/usage"] <= 1 and val[f"memory/layer{i}/kl_weight"] >= 0
    balance = [r.get("train/balance_loss") for r in rows if "train/loss" in r]
    if variant == "ultramem":  # 0.01 x (two layers x the two halves' balance loss, 2 at balance)
        assert all(isinstance(b, float) and 0 < b < losses[0] for b in balance)
    else:  # no balance loss asked for: no such term, the forward as before
        assert balance == [None] * 4


@pytest.mark.parametrize("variant", ["memory_plus", "peer"])
def test_resume_is_bitwise_equal_for_memory_plus_and_peer(tmp_path, variant):
    # Memory+ with the values clipped apart and at a constant LR (its paper's settings, which the
    # checkpoint must carry through: the optimizer's groups and the clip's split).
    steps = (
        *VARIANTS[variant],
        "train.max_steps=6",
        "eval.interval=3",
        "checkpoint.interval=100",
        "optim.values_grad_clip=1.0",
        "optim.values_schedule=constant",
    )
    _train(tmp_path / "straight", *steps)
    _train(tmp_path / "split", *steps, "train.stop_at_step=3")
    _train(tmp_path / "split", *steps)  # resume=auto from step 3
    for key in ("train/loss", "train/values_grad_norm", "val/loss"):
        a = {r["step"]: r[key] for r in read_rows(tmp_path / "straight") if key in r}
        b = {r["step"]: r[key] for r in read_rows(tmp_path / "split") if key in r}
        assert a and a == b, key  # float equality: bitwise
    a, b = _model_state(tmp_path / "straight"), _model_state(tmp_path / "split")
    assert a.keys() == b.keys() and any(k.endswith("down.weight") for k in a) == (variant == "peer")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_balance_loss_trains_the_keys_and_query_not_the_values(tmp_path):
    """One real step with the coefficient 0 and 0.5 from the same initial weights and batch: the
    training loss differs by exactly the logged balance term, the keys and the query network move
    differently, the values (clipped apart, so no shared clip factor) move the same. One memory layer:
    with two, the second's balance loss would reach the first's values through the residual stream."""
    steps = (
        "memory=ultramem",
        "train.max_steps=1",
        "eval.interval=1",
        "checkpoint.interval=1",
        "optim.values_grad_clip=1.0",
    )
    _train(tmp_path / "off", *steps, "model.memory.balance_loss=0")
    _train(tmp_path / "on", *steps, "model.memory.balance_loss=0.5")
    off = next(r for r in read_rows(tmp_path / "off") if "train/loss" in r)
    on = next(r for r in read_rows(tmp_path / "on") if "train/loss" in r)
    assert "train/balance_loss" not in off and on["train/balance_loss"] > 0.5  # 0.5 x (about 1 per half)
    assert on["train/loss"] - on["train/balance_loss"] == pytest.approx(off["train/loss"], abs=1e-5)
    a, b = _model_state(tmp_path / "off"), _model_state(tmp_path / "on")
    retrieval = [k for k in a if k.endswith(("memory.keys", "memory.query_proj.weight"))]
    assert len(retrieval) == 2
    for k in retrieval:
        assert not torch.equal(a[k], b[k]), k
    for k in ("shared_values.weight", "shared_down.weight"):
        assert torch.equal(a[k], b[k]), k


def test_balance_loss_under_gradient_accumulation_is_the_mean_over_micro_batches(tmp_path):
    """`train_step` with two micro-batches: its balance term is the mean of the model's balance loss
    on each half (each micro-batch counts its own sub-key usage), and `loss` = cross entropy +
    balance, both averaged the same way."""
    composed = _compose(*VARIANTS["ultramem"], "train.micro_batch_size=2")
    cfg = OmegaConf.to_object(composed)
    validate(cfg)
    (tmp_path / "run").mkdir()
    t = setup(cfg, tmp_path / "run", OmegaConf.to_container(composed, resolve=True), resolve_data(cfg.data), DistInfo())
    with t.sinks:
        t.model.train()
        batch = next(t.batches)
        assert batch.shape[0] == 4
        with torch.no_grad():  # before the step changes the weights; no dropout in TINY
            halves = [t.model(mb[:, :-1], mb[:, 1:], return_aux=True) for mb in batch.split(2)]
        whole = t.model(batch[:, :-1], batch[:, 1:], return_aux=True)[2]
        expected_balance = sum(h[2] for h in halves) / 2
        expected_loss = sum(h[1] + h[2] for h in halves) / 2
        out = train_step(t, batch)
    assert out is not None
    assert out.terms["balance_loss"].item() == pytest.approx(expected_balance.item(), rel=1e-5)
    assert out.terms["loss"].item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert whole.item() != pytest.approx(expected_balance.item(), rel=1e-5)  # counts over the whole batch differ


PEER_DOWN = variants.down_table(MemoryConfig(values_kind="peer"), 64)  # (what, 64 columns), as train's setup asks


def test_sharded_peer_down_vectors_must_divide_into_the_processes():
    three = DistInfo(rank=0, world_size=3, backend="gloo")
    with pytest.raises(ConfigError, match="model.memory.shard_values.*PEER's down vectors.*model.dim=64"):
        check_parallel_config("ddp", True, 66, three, down=PEER_DOWN)  # values split, down vectors do not
    check_parallel_config("ddp", True, 66, three)  # no down vectors: only v_dim counts
    check_parallel_config("ddp", True, 64, DistInfo(rank=0, world_size=2, backend="gloo"), down=PEER_DOWN)


ARMS = {  # the optimizer settings each arm's paper trains its values with, and the name compare gives it
    "dense": ({"values_lr": 1e-3, "values_schedule": "follow", "values_grad_clip": 0.0}, "dense"),
    "pkm": ({"values_lr": 1e-3, "values_schedule": "constant", "values_grad_clip": 1.0}, "PKM (replace)"),
    "pkm_parallel": ({"values_lr": 1e-3, "values_schedule": "constant", "values_grad_clip": 1.0}, "PKM (parallel)"),
    "memory_plus": (
        {"values_lr": 1e-3, "values_schedule": "constant", "values_grad_clip": 1.0},
        "Memory+ (replace, qk-norm, shared pool)",
    ),
    "peer": ({"values_lr": 3e-3, "values_schedule": "follow", "values_grad_clip": 0.0}, "PEER (replace)"),
    "ultramem": (
        {"values_lr": 3e-3, "values_schedule": "follow", "values_grad_clip": 0.0},
        "UltraMem-style (parallel, qk-norm, shared pool, balance 0.01)",
    ),
    # Engram's tables: their own group at optim.lr x model.memory.engram_tables_lr_mult (no values table)
    "engram": ({"values_lr": 1e-3, "values_schedule": "follow", "values_grad_clip": 0.0}, "Engram (engram L1)"),
}


@pytest.mark.parametrize("arm", list(ARMS))
def test_sweep_arms_set_memory_and_their_papers_optimizer(arm):
    expected, name = ARMS[arm]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment/variants={arm}"])
        sweep = compose(config_name="config", overrides=["experiment=sweep/variants"], return_hydra_config=True)
    arms = sweep.hydra.sweeper.params["+experiment/variants"].split(",")
    assert arms[0] == "dense" and arm in arms and len(arms) == len(ARMS)  # the baseline first
    typed = OmegaConf.to_object(cfg)
    validate(typed)
    assert {k: getattr(typed.optim, k) for k in expected} == expected
    assert typed.name == f"variants/{arm}" and typed.model.n_layers == 4 and typed.model.dim == 256
    # every arm: the same data, seed, batch and steps (tiny/common), the other optimizer settings equal
    assert (typed.train.max_steps, typed.train.batch_size, typed.optim.lr, typed.data.seq_len) == (600, 16, 3e-3, 128)
    memory = typed.model.memory
    assert bool(memory.layers) == (arm not in ("dense", "engram"))  # Engram sits beside the FFNs
    if arm == "ultramem":
        assert memory.balance_loss > 0 and memory.values_kind == "peer"
    assert variant_name(OmegaConf.to_container(cfg.model.memory)) == name


@pytest.mark.slow
def test_variants_sweep_then_compare_names_each_variant_with_its_size_and_cost(tmp_path, capsys):
    """`pkmlm-train experiment=sweep/variants` cut to three arms at tiny sizes, then pkmlm-compare on
    its sweep directory: variants.md names each arm's variant beside its own parameters, FLOPs per
    token, usage and (UltraMem-style) balance loss, and variants.png is written."""
    small = [
        o
        for o in overrides("train.max_steps=2", "eval.interval=2", "checkpoint.interval=2")
        if not o.startswith(("model.n_layers=", "model.memory.layers="))
    ]
    proc = run_cli(
        "pkmlm.cli.train",
        ["experiment=sweep/variants", "+experiment/variants=dense,memory_plus,ultramem", *small],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = [p.parent for p in tmp_path.glob("multirun/sweep/variants/*/multirun.yaml")]
    compare_main([str(sweep_dir), "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    table = (tmp_path / "cmp" / "variants.md").read_text()
    assert table.strip() in printed
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [r[0].lstrip("| ") for r in rows] == [ARMS[a][1] for a in ("dense", "memory_plus", "ultramem")]
    for row, job in zip(rows, ("0", "1", "2")):
        final = read_rows(sweep_dir / job)[-1]
        assert row[4] == f"{si(final['params_total'], 2)} / {si(final['params_active'], 2)}"
        assert row[5] == si(final["flops_per_token"], 1)
    assert rows[0][9] == "—" and rows[1][9].endswith("%") and float(rows[2][11].rstrip(" |")) > 0
    assert (tmp_path / "cmp" / "variants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- DDP: the balance loss per rank, averaged like the cross entropy ------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_balance_loss_two_processes_equal_one_with_a_micro_batch_per_rank(tmp_path):
    """UltraMem-style with its balance loss, 2 processes (DDP, each rank counts its own half's
    sub-key usage) = 1 process running the same 2 data shards as 2 micro-batches of the same halves."""
    steps = (
        *VARIANTS["ultramem"],
        "train.max_steps=3",
        "eval.interval=3",
        "checkpoint.interval=3",
        "eval.batch_size=4",
    )  # the same validation batches (else the micro-batch size sets them)
    _train(tmp_path / "one", *steps, "train.data_shards=2", "train.micro_batch_size=2")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "pkmlm.cli.train",
        *overrides(*steps),
        f"hydra.run.dir={tmp_path / 'two'}",
    ]
    proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for key in ("train/loss", "train/balance_loss", "train/grad_norm", "val/loss"):
        one = {r["step"]: r[key] for r in read_rows(tmp_path / "one") if key in r}
        two = {r["step"]: r[key] for r in read_rows(tmp_path / "two") if key in r}
        assert one.keys() == two.keys() and one, key
        for step, value in one.items():
            assert abs(value - two[step]) <= 1e-5 * max(1.0, abs(value)), (key, step, value, two[step])
