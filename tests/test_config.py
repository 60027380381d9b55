"""Config composition: every preset composes into the typed schema and validates; bad values and
misspelt keys are refused with messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pkmlm.config import Config, config_dir, register_configs, validate
from pkmlm.errors import ConfigError

register_configs()
CONFIGS = Path(config_dir())


def _compose(overrides: list[str]) -> Config:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_default_is_tiny_with_memory_on_wiki():
    cfg = _compose([])
    validate(cfg)
    assert cfg.model.dim == 256 and cfg.model.n_layers == 4
    assert cfg.model.memory.layers == [2]
    assert cfg.data.files[0].endswith("wiki/enwiki2015_first800.jsonl.gz")
    assert cfg.logging.wandb.mode == "offline"


def test_sample_data_is_in_the_repository(monkeypatch):
    """The default run needs nothing beside the clone (issue 11): data/ is the default sample_dir."""
    monkeypatch.delenv("PKMLM_SAMPLE_DIR", raising=False)
    cfg = _compose([])
    root = Path(__file__).resolve().parents[1]
    assert cfg.paths.sample_dir == str(root / "data") and Path(cfg.data.files[0]).is_file()
    for preset in ("wiki", "c4", "mix"):
        data = _compose([f"data={preset}"]).data
        files = list(data.files) + [f for s in data.sources for f in s.files]
        assert files and all(Path(f).is_file() and Path(f).is_relative_to(root / "data") for f in files)


@pytest.mark.parametrize("group", ["model", "memory", "data", "optim", "train", "logging"])
def test_every_group_preset_composes_and_validates(group):
    for name in _presets(group):
        overrides = [f"{group}={name}"]
        if group == "memory" and name in ("small", "paper"):
            overrides.append("model=base12")  # their memory sits at layer 6 of 12
        validate(_compose(overrides))


@pytest.mark.parametrize("name", _presets("experiment"))
def test_every_experiment_composes_and_validates(name):
    cfg = _compose([f"experiment={name}"])
    validate(cfg)
    assert cfg.name == name


def test_paper_presets():
    mem12 = _compose(["experiment=mem12"])
    assert (mem12.model.n_layers, mem12.model.dim, mem12.model.n_heads) == (12, 1024, 16)
    m = mem12.model.memory
    assert (m.n_keys, m.heads, m.knn, m.k_dim, m.query_norm, m.placement) == (512, 4, 32, 512, "batchnorm", "replace")
    assert 0 < m.layers[0] < 11  # an intermediate layer
    dense24 = _compose(["experiment=dense24"])
    assert dense24.model.n_layers == 24 and dense24.model.memory.layers == []


def test_sample_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PKMLM_SAMPLE_DIR", str(tmp_path))
    cfg = _compose([])
    assert cfg.paths.sample_dir == str(tmp_path)
    assert cfg.data.files[0].startswith(str(tmp_path))


def test_misspelt_key_and_wrong_type_are_refused():
    with pytest.raises(Exception, match="no_such_key"):
        _compose(["model.no_such_key=1"])
    with pytest.raises(Exception, match="dim"):
        _compose(["model.dim=wide"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.memory.layers=[4]", "model.memory.layers"),
        ("model.memory.layers=[-1]", "model.memory.layers"),
        ("model.memory.knn=1000", "model.memory.knn"),
        ("model.memory.k_dim=127", "model.memory.k_dim"),
        ("model.n_heads=3", "model.n_heads"),
        ("model.memory.placement=sideways", "model.memory.placement"),
        ("data.seq_len=4096", "data.seq_len"),
        ("train.micro_batch_size=5", "train.micro_batch_size"),
        ("train.stop_at_step=100000", "train.stop_at_step"),
        ("optim.schedule=linearish", "optim.schedule"),
        ("logging.wandb.mode=sometimes", "logging.wandb.mode"),
        ("optim.lr=-1", "optim.lr"),
        # every value of the model group
        ("model.vocab_size=-1", "model.vocab_size"),
        ("model.n_layers=0", "model.n_layers"),
        ("model.dim=0", "model.dim"),
        ("model.n_heads=0", "model.n_heads"),
        ("model.ffn_mult=0", "model.ffn_mult"),
        ("model.max_seq_len=0", "model.max_seq_len"),
        ("model.pos_emb=alibi", "model.pos_emb"),
        ("model.rope_theta=0", "model.rope_theta"),
        ("model.dropout=1.0", "model.dropout"),
        ("model.norm_eps=0", "model.norm_eps"),
        ("model.memory.layers=[2,2]", "model.memory.layers"),
        ("model.memory.n_keys=0", "model.memory.n_keys"),
        ("model.memory.heads=0", "model.memory.heads"),
        ("model.memory.knn=0", "model.memory.knn"),
        ("model.memory.k_dim=0", "model.memory.k_dim"),
        ("model.memory.v_dim=0", "model.memory.v_dim"),
        ("model.memory.query_norm=rms", "model.memory.query_norm"),
        ("model.memory.input_dropout=-0.1", "model.memory.input_dropout"),
        ("model.memory.query_dropout=1", "model.memory.query_dropout"),
        ("model.memory.value_dropout=2", "model.memory.value_dropout"),
        ("model.memory.kernel=cuda", "model.memory.kernel"),
        ("model.memory.values_dtype=float16", "model.memory.values_dtype"),
        # every value of the data group that needs no file (paths: test_data_sources.py)
        ("data.seq_len=0", "data.seq_len"),
        ("data.text_field=''", "data.text_field"),
        ("data.vocab_size=256", "data.vocab_size"),
        ("data.vocab_size=258 data.special_tokens=['<|pad|>','<|sep|>']", "data.vocab_size"),
        ("data.special_tokens=['']", "data.special_tokens"),
        ("data.special_tokens=['<|pad|>','<|pad|>']", "data.special_tokens"),
        ("data.tokenizer_docs=0", "data.tokenizer_docs"),
        ("data.val_docs=-1", "data.val_docs"),
        ("data.encode_batch_docs=0", "data.encode_batch_docs"),
        ("data.shuffle_buffer=-1", "data.shuffle_buffer"),
        ("data.min_chars=-1", "data.min_chars"),
        ("data.dedup_window=-1", "data.dedup_window"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.prepared_order=shuffled", "data.prepared_order"),
        ("data=prepared data.prepared=null", "data.prepared"),
        # every value of the train group
        ("train.max_steps=0", "train.max_steps"),
        ("train.stop_at_step=0", "train.stop_at_step"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.device=cudax", "train.device"),
        ("train.device=gpu", "train.device"),
        ("train.precision=fp16", "train.precision"),
        ("train.max_consecutive_nonfinite=0", "train.max_consecutive_nonfinite"),
        ("train.max_tokens=0", "train.max_tokens"),
        ("train.max_time=0", "train.max_time"),
        ("train.peak_flops=-1", "train.peak_flops"),
        ("train.parallel=zero3", "train.parallel"),
        ("train.data_shards=3", "train.data_shards"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(override, key):
    cfg = _compose(override.split(" "))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_smallest_vocabulary_is_bytes_eos_and_special_tokens():
    validate(_compose(["data.vocab_size=257"]))  # 256 bytes + <|endoftext|>
    validate(_compose(["data.vocab_size=259", "data.special_tokens=['<|pad|>','<|endoftext|>','<|sep|>']"]))


def test_memory_estimate_counts_the_built_model_and_refuses_what_cannot_fit():
    import torch

    from pkmlm.config import check_fits_device, estimate_train_memory
    from pkmlm.errors import UserError
    from pkmlm.model.transformer import Transformer

    cfg = _compose(["model.vocab_size=512"])
    n_params = sum(p.numel() for p in Transformer(cfg.model).parameters())
    need = estimate_train_memory(cfg)
    assert need["n_params"] == n_params and need["params"] == 16 * n_params  # weights, grads, 2 AdamW moments
    assert need["activations"] > 0
    check_fits_device(cfg, torch.device("cpu"))  # the default run fits any machine that runs the tests
    huge = _compose(["model.memory.n_keys=100000"])
    with pytest.raises(UserError, match=r"needs about [\d,.]+ GB .* RAM available; lower model\.memory\.n_keys"):
        check_fits_device(huge, torch.device("cpu"))


def test_a_command_line_run_checks_each_rule_once(tmp_path, monkeypatch):
    """Each config rule runs once per process (issue 22): pkmlm-train checks every job before Hydra
    starts, and `train()` checks the config it is given with the same function (`check_run`); the
    second is a lookup. Counted in a real run of pkmlm-train's `main()` in this process: the data
    group's rules (they ran four times: in the precheck's validate and resolve_data, and again in
    train()), the root's, the data paths and the memory estimate."""
    import collections
    import sys

    from helpers import overrides

    import pkmlm.config
    import pkmlm.data.config
    import pkmlm.errors
    import pkmlm.train.checks
    from pkmlm.cli import train as cli_train

    runs: collections.Counter = collections.Counter()

    def count(module, name, key=None):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            if key is None or args[1] == key:  # require(ok, key, ...): the rule named `key`
                runs[key or name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    monkeypatch.setattr(pkmlm.errors, "_PASSED", {})  # what earlier tests of this process checked
    count(pkmlm.data.config, "require", "data.seq_len")  # DataConfig.validate's first rule
    count(pkmlm.config, "require", "train.device")  # a rule of TrainConfig.validate (check_device)
    count(pkmlm.config, "require", "name")  # the root validate's first rule (check_name)
    count(pkmlm.train.checks, "resolve_data")  # the data paths (globs, stat)
    count(pkmlm.train.checks, "check_fits_device")  # the memory estimate
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PKMLM_RUN_TIME", "2020-01-01T00:00:00")  # set by the precheck: not for later tests
    run_dir = tmp_path / "run"
    args = overrides("train.max_steps=1", "eval.max_batches=1")
    monkeypatch.setattr(sys, "argv", ["pkmlm-train", *args, f"hydra.run.dir={run_dir}"])
    try:
        cli_train.main()
    finally:
        GlobalHydra.instance().clear()
    assert (run_dir / "metrics.jsonl").stat().st_size > 0 and (run_dir / ".hydra" / "overrides.yaml").is_file()
    expected = ["data.seq_len", "train.device", "name", "resolve_data", "check_fits_device"]
    assert dict(runs) == dict.fromkeys(expected, 1)
