"""Experiment presets, sweeps, budgets and throughput accounting.

Every preset under configs/experiment/ composes, validates and builds (on the meta device: no
memory is allocated, so the paper's 268M-value model costs nothing); every job of every compare
and sweep preset does too, and a compare group's arms are matched. Token and time budgets stop a
run with its account in the final row; the memory statistics per head are checked on hand-made
routing data against values worked out by hand.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from pkmlm.config import SWEEP_RESOLVER as RESOLVER
from pkmlm.config import Config, config_dir, register_configs, validate
from pkmlm.errors import ConfigError
from pkmlm.metrics.flops import _table_peak, mfu, peak_flops
from pkmlm.metrics.memory_usage import MemoryUsage, memory_metrics
from pkmlm.model.transformer import Transformer
from pkmlm.train.clock import RunClock, budget_reached
from pkmlm.train.setup import model_config_for

register_configs()
EXPERIMENTS = Path(config_dir()) / "experiment"
PRESETS = sorted(str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in EXPERIMENTS.rglob("*.yaml"))


def _compose(overrides_: list[str], hydra: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=overrides_, return_hydra_config=hydra)


def _jobs(preset: str) -> list[list[str]]:
    """The override lists of the jobs a preset launches: one (itself) for a single run, the grid of
    its hydra.sweeper.params for a compare or sweep preset (as Hydra's basic sweeper expands it)."""
    cfg = _compose([f"experiment={preset}"], hydra=True)
    params = cfg.hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [f"{o.get_key_element()}={o.get_value_element_as_str()}"]
        for o in parsed
    ]
    return [[f"experiment={preset}", *job] for job in itertools.product(*axes)]


@functools.lru_cache(maxsize=None)
def _typed(job: tuple) -> Config:
    """A job's typed config, composed once per test session (the tests only read it)."""
    return OmegaConf.to_object(_compose(list(job)))


def _build_on_meta(cfg: Config) -> Transformer:
    # The tokenizer's vocabulary is at most data.vocab_size; padded as the loop pads it.
    model_cfg = model_config_for(cfg.model, cfg.data.vocab_size)
    with torch.device("meta"):
        return Transformer(model_cfg)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_every_job_composes_validates_and_builds(preset):
    jobs = _jobs(preset)
    assert jobs
    for job in jobs:
        cfg = _typed(tuple(job))
        if cfg.train.finetune != "full" and cfg.init_from is None:
            # A finetuning preset (forgetting/*) names its pretrained run on the command line.
            with pytest.raises(ConfigError, match="init_from"):
                validate(cfg)
            cfg = _typed((*job, "init_from=outputs/forgetting/pretrain"))
        validate(cfg)
        model = _build_on_meta(cfg)
        assert next(model.parameters()).device.type == "meta"
        assert list(model.memory_layers()) == sorted(cfg.model.memory.layers)


def _family(name: str) -> dict[str, Config]:
    return {
        arm: _typed((f"experiment={name}/{arm}",))
        for arm in sorted(p.stem for p in (EXPERIMENTS / name).glob("*.yaml") if p.stem != "common")
    }


@pytest.mark.parametrize(
    "family, mem, dense, heads",
    [
        ("paper", "mem12", ("dense12", "dense16", "dense24"), 16),
        ("small", "mem12", ("dense12", "dense16", "dense24"), 8),
        ("tiny", "mem4", ("dense4", "dense5", "dense8"), 4),
    ],
)
def test_families_keep_the_papers_ratios_and_match_their_runs(family, mem, dense, heads):
    runs = _family(family)
    assert sorted(runs) == sorted([mem, *dense])
    m = runs[mem].model
    # The memory replaces the FFN of an intermediate layer, as in the paper.
    assert len(m.memory.layers) == 1 and 0 < m.memory.layers[0] < m.n_layers - 1
    assert m.memory.placement == "replace" and m.memory.query_norm == "batchnorm"
    assert m.dim // m.n_heads == 64 and m.n_heads == heads  # head dim 64 in every family
    depths = [runs[d].model.n_layers for d in dense]
    assert depths[0] == m.n_layers and depths[2] == 2 * m.n_layers  # dense12-like and dense24-like
    assert m.n_layers < depths[1] < depths[2]
    for d in dense:
        assert runs[d].model.memory.layers == [] and runs[d].model.dim == m.dim
    # Matched: everything but the model is the same (data and order, seed, batch, schedule).
    for cfg in runs.values():
        for section in ("data", "optim", "train", "eval"):
            assert getattr(cfg, section) == getattr(runs[mem], section), (family, section)
        assert cfg.seed == runs[mem].seed


def test_paper_presets_and_the_speed_structure_of_the_claim():
    runs = _family("paper")
    mem = runs["mem12"].model.memory
    assert (mem.n_keys, mem.heads, mem.knn, mem.k_dim) == (512, 4, 32, 512)
    assert runs["mem12"].model.dim == 1024
    models = {arm: _build_on_meta(cfg) for arm, cfg in runs.items()}
    counts = {arm: model.count_parameters() for arm, model in models.items()}
    assert counts["mem12"]["memory_values"] == 512**2 * 1024
    # More parameters than dense24 in all, but each token touches fewer than dense12's (the memory's
    # query network, keys and 4 x 32 value rows are fewer than the FFN it replaces), so it costs
    # about half the FLOPs of dense24: active FLOPs count the rows read, not the table.
    assert counts["mem12"]["total"] > counts["dense24"]["total"]
    assert counts["mem12"]["active"] < counts["dense12"]["active"]
    flops = {arm: model.flops_per_token(512) for arm, model in models.items()}
    assert flops["mem12"] < 0.6 * flops["dense24"]
    assert 0.9 * flops["dense12"] < flops["mem12"] < flops["dense12"]


def test_compare_groups_launch_matched_arms_baseline_first():
    for preset in (
        "compare/tiny_mem_vs_dense",
        "compare/small_mem_vs_dense",
        "compare/paper_mem_vs_dense",
        "compare/mem12_vs_dense24",
    ):
        configs = [_typed(tuple(job)) for job in _jobs(preset)]
        assert len(configs) >= 2
        assert configs[0].model.memory.layers == []  # the deepest dense arm is the baseline
        assert configs[0].model.n_layers == max(c.model.n_layers for c in configs)
        assert any(c.model.memory.layers for c in configs)
        for c in configs[1:]:
            assert (c.data, c.optim, c.train, c.seed) == (
                configs[0].data,
                configs[0].optim,
                configs[0].train,
                configs[0].seed,
            )
        assert _compose([f"experiment={preset}"], hydra=True).hydra.mode.name == "MULTIRUN"


def test_joblib_launcher_composes():
    cfg = _compose(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], hydra=True)
    assert cfg.hydra.launcher.n_jobs == 2 and "joblib" in cfg.hydra.launcher._target_.lower()


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install 'pkmlm[slurm]')",
)
def test_slurm_launcher_composes():
    cfg = _compose(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "experiment=compare/small_mem_vs_dense"], hydra=True
    )
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert launcher.signal_delay_s > 0


def test_sweep_name_is_the_masters_for_every_job():
    # What Hydra does per job (ConfigLoader.load_sweep_config): compose anew, then copy the
    # master's resolver cache in. A job whose experiment renames it stays in the master's dir.
    master = OmegaConf.create({"name": "compare/x", "dir": f"multirun/${{{RESOLVER}:${{name}}}}"})
    assert master.dir == "multirun/compare/x"
    job = OmegaConf.create({"name": "tiny/mem4", "dir": f"multirun/${{{RESOLVER}:${{name}}}}"})
    OmegaConf.copy_cache(from_config=master, to_config=job)
    assert job.dir == "multirun/compare/x"
    alone = OmegaConf.create({"name": "tiny/mem4", "dir": f"multirun/${{{RESOLVER}:${{name}}}}"})
    assert alone.dir == "multirun/tiny/mem4"  # a single run: its own name


# --- budgets, the final row, throughput keys ----------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_tokens=0", "train.max_tokens"),
        ("train.max_time=-5", "train.max_time"),
        ("train.peak_flops=0", "train.peak_flops"),
    ],
)
def test_bad_budgets_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(OmegaConf.to_object(_compose([override])))


def test_budget_and_clock_rules():
    assert budget_reached(None, None, 10**12, 1e9) is None
    assert budget_reached(100, None, 99, 0.0) is None and budget_reached(100, None, 100, 0.0) == "max_tokens"
    assert budget_reached(None, 5.0, 0, 5.0) == "max_time"
    clock = RunClock(
        torch.device("cpu"), flops_per_token=10.0, peak_flops=None, wall_before_s=100.0, train_before_s=60.0
    )
    with clock.paused():
        time.sleep(0.05)
    assert clock.wall_s() >= 100.05 and clock.train_s() >= 60.0
    assert clock.wall_s() - clock.train_s() >= 40.05 - 1e-9  # earlier pauses plus this one


def test_peak_flops_table_and_mfu():
    assert _table_peak("NVIDIA H100 80GB HBM3", True, False) == pytest.approx(989.4e12)
    assert _table_peak("NVIDIA H100 PCIe", True, False) == pytest.approx(756.5e12)
    assert _table_peak("NVIDIA A100-SXM4-80GB", False, True) == pytest.approx(156e12)  # tf32
    assert _table_peak("NVIDIA A100-SXM4-80GB", False, False) == pytest.approx(19.5e12)
    assert _table_peak("NVIDIA A10G", True, False) is None  # not the A10: unknown, no guess
    assert _table_peak("NVIDIA L40S", True, False) == pytest.approx(362.05e12)
    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), None, configured=2e12) == 2e12
    assert mfu(6e6, 1e5, 1e12) == pytest.approx(0.6) and mfu(6e6, 1e5, None) is None


# --- memory statistics per head on hand-made routing data ------------------------------------------


def test_per_head_and_overall_statistics_on_hand_made_routing():
    # 8 slots, 2 heads, knn 2, 4 tokens. Head 0 always reads slots (0, 1) with weights (0.75, 0.25);
    # head 1 reads token t's slots (2t, 2t+1) with 0.5 each: a perfectly even spread.
    tokens = 4
    indices = torch.tensor([[[0, 1], [2 * t, 2 * t + 1]] for t in range(tokens)])  # (N, H, K)
    weights = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]] * tokens)
    tracker = MemoryUsage(n_slots=8, heads=2)
    tracker.update(indices, weights)
    stats = memory_metrics({3: tracker})
    log8 = math.log(8)

    def xlogx(p):
        return sum(q * math.log(q) for q in p if q > 0)

    head0, head1, all_ = "memory/layer3/head0/", "memory/layer3/head1/", "memory/layer3/"
    # head 0: weights (3, 1) on 2 of 8 slots, counts (4, 4)
    assert stats[head0 + "usage"] == 2 / 8
    assert stats[head0 + "kl_weight"] == pytest.approx(log8 + xlogx([0.75, 0.25]))
    assert stats[head0 + "kl_count"] == pytest.approx(math.log(4))
    assert stats[head0 + "gini"] == pytest.approx(26 / 32)  # sorted (0 x6, 1, 3): (5*1 + 7*3) / (8*4)
    assert (stats[head0 + "top50"], stats[head0 + "top90"], stats[head0 + "top99"]) == (1, 2, 2)
    # head 1: 0.5 on each of the 8 slots
    assert stats[head1 + "usage"] == 1.0
    assert stats[head1 + "kl_weight"] == pytest.approx(0.0, abs=1e-12)
    assert stats[head1 + "kl_count"] == pytest.approx(0.0, abs=1e-12)
    assert stats[head1 + "gini"] == pytest.approx(0.0, abs=1e-12)
    assert (stats[head1 + "top50"], stats[head1 + "top90"], stats[head1 + "top99"]) == (4, 8, 8)
    # both heads: weights (3.5, 1.5, 0.5 x6) of 8, counts (5, 5, 1 x6) of 16
    assert stats[all_ + "usage"] == 1.0
    assert stats[all_ + "kl_weight"] == pytest.approx(log8 + xlogx([3.5 / 8, 1.5 / 8] + [0.5 / 8] * 6))
    assert stats[all_ + "kl_count"] == pytest.approx(log8 + xlogx([5 / 16, 5 / 16] + [1 / 16] * 6))
    assert stats[all_ + "gini"] == pytest.approx(26 / 64)
    assert (stats[all_ + "top50"], stats[all_ + "top90"], stats[all_ + "top99"]) == (2, 7, 8)


def test_the_forgetting_benchmark_pins_its_memory_shape_rather_than_inheriting_the_knowledge_arms():
    """forgetting/pretrain builds on knowledge/mem, whose size issue 21's capacity sweep decides: the
    forgetting benchmark's memory (64^2 slots, 2 heads, knn 16, k_dim 32, as measured in the README)
    is written in its own preset, so resizing knowledge/mem leaves it as it was."""
    own = OmegaConf.load(EXPERIMENTS / "forgetting" / "pretrain.yaml").model.memory
    assert {k: own.get(k) for k in ("n_keys", "heads", "knn", "k_dim")} == {
        "n_keys": 64,
        "heads": 2,
        "knn": 16,
        "k_dim": 32,
    }
    composed = _compose(["experiment=forgetting/pretrain"]).model.memory
    assert (composed.n_keys, composed.heads, composed.knn, composed.k_dim) == (64, 2, 16, 32)
