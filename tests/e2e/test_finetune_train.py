"""Finetuning through the training loop (issue 16): `init_from` starts from another run's weights
(its tokenizer, step 0, its own run directory), `train.finetune=sparse_memory` moves exactly the
TF-IDF-selected value rows in a real step and nothing else, a finetune resumes bitwise like any
run (optimizer, background cache, staleness trackers), and a model mismatch is one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_config, overrides, read_rows, run_cli, train_in_process
from omegaconf import OmegaConf

from pkmlm.checkpoint import store
from pkmlm.config import register_configs
from pkmlm.data.loader import build_train_batches, resolve_data
from pkmlm.data.tokenizer import tokenizer_from_str
from pkmlm.errors import UserError
from pkmlm.finetune import BACKGROUND_FILE, BackgroundCounts, RowSelection, slot_pools
from pkmlm.run import load_run

register_configs()
SPARSE = ("train.finetune=sparse_memory", "finetune.background_batches=4", "finetune.top_t=8")


_compose = compose_config
_train = train_in_process


def _model_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return store.read(store.latest_valid(run_dir / "checkpoints"))["model"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    _train(run_dir, "train.max_steps=3", "checkpoint.interval=3")
    return run_dir


def test_sparse_memory_step_through_the_loop_moves_only_the_selected_rows(pretrained, tmp_path):
    run_dir = tmp_path / "ft"
    _train(run_dir, f"init_from={pretrained}", *SPARSE, "train.max_steps=1", "checkpoint.interval=1")
    source = store.latest_valid(pretrained / "checkpoints")
    meta = store.read_meta(store.latest_valid(run_dir / "checkpoints"))
    # init_from: a fresh start of its own (step 1 of 1, its own directory), the source's tokenizer
    assert meta["step"] == 1 and meta["init_from"] == str(source)
    assert (run_dir / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()
    assert [r["step"] for r in read_rows(run_dir) if "train/loss" in r] == [1]

    before, after = _model_tensors(pretrained), _model_tensors(run_dir)
    table = "blocks.1.memory.values.weight"
    assert set(before) == set(after) and table in before
    for key in before:  # every other parameter and buffer (BatchNorm statistics too): bit-identical
        if key != table:
            assert torch.equal(before[key], after[key]), key
    changed_S = (before[table] != after[table]).any(1)

    # The rows that step had to select, recomputed outside the loop: the cached background, the
    # run's first batch, the source model's reads, TF-IDF top-t.
    cfg = OmegaConf.to_object(_compose(f"init_from={pretrained}", *SPARSE))
    source_model = load_run(source).model
    (pool,) = slot_pools(source_model)
    background = _cached_background(run_dir, pool)
    tokenizer = tokenizer_from_str((run_dir / "tokenizer.json").read_text())
    batch = next(
        build_train_batches(cfg.data, resolve_data(cfg.data), tokenizer, batch_size=cfg.train.batch_size, seed=cfg.seed)
    )
    selection = RowSelection(source_model, background, top_t=8)
    selection.attach()
    with torch.no_grad():
        source_model(batch[:, :-1])
    selected_S = selection.select()[pool]
    assert 0 < int(selected_S.sum()) <= 8
    assert torch.equal(changed_S, selected_S)  # exactly the selected rows moved


def _cached_background(run_dir: Path, pool: str):
    """The background counts the run cached, read back as the loop wrote them (whatever fingerprint)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = run_dir / BACKGROUND_FILE
    with safe_open(str(path), framework="pt") as f:
        num_batches = int(f.metadata()["num_batches"])
    tensors = load_file(str(path))
    assert num_batches == 4
    return BackgroundCounts(num_batches, {pool: tensors[f"{pool}/batches_with_slot"]}, {pool: tensors[f"{pool}/reads"]})


def test_resume_of_a_finetune_is_bitwise_equal_to_uninterrupted(pretrained, tmp_path):
    """Lazy Adam's moments, the background cache and the staleness trackers all cross the resume."""
    steps = (
        f"init_from={pretrained}",
        *SPARSE,
        "finetune.optimizer=adam",
        "finetune.lr=0.01",
        "train.max_steps=4",
        "eval.interval=2",
        "checkpoint.interval=100",
        "metrics.stale_window=2",
    )
    _train(tmp_path / "straight", *steps)
    _train(tmp_path / "split", *steps, "train.stop_at_step=2")
    cache = tmp_path / "split" / BACKGROUND_FILE
    mtime = cache.stat().st_mtime_ns
    _train(tmp_path / "split", *steps)  # resume=auto from step 2
    assert cache.stat().st_mtime_ns == mtime  # counted once: the resume read the cache
    rows = {name: read_rows(tmp_path / name) for name in ("straight", "split")}
    losses = {name: {r["step"]: r["train/loss"] for r in rs if "train/loss" in r} for name, rs in rows.items()}
    assert list(losses["straight"]) == [1, 2, 3, 4] and losses["straight"] == losses["split"]
    a, b = _model_tensors(tmp_path / "straight"), _model_tensors(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    stale = {
        name: [(r["step"], r["memory/layer1/stale"]) for r in rs if "memory/layer1/stale" in r]
        for name, rs in rows.items()
    }
    assert [s for s, _ in stale["straight"]] == [2, 4] and stale["straight"] == stale["split"][-2:]
    assert 0 < stale["straight"][-1][1] < 1
    saved = store.read(store.latest_valid(tmp_path / "split" / "checkpoints"))["stale"]["layer1"]
    assert int(saved["step"]) == 4
    # The value tables moved, nothing else did (Adam's moments never touch an unselected row).
    source = _model_tensors(pretrained)
    moved = [k for k in a if not torch.equal(a[k], source[k])]
    assert moved == ["blocks.1.memory.values.weight"]


def test_init_from_model_mismatch_is_one_line_exit_2(pretrained, tmp_path):
    proc = run_cli(
        "pkmlm.cli.train",
        [
            *overrides(
                f"init_from={pretrained}", "model.dim=32", "model.memory.k_dim=8", f"hydra.run.dir={tmp_path / 'ft'}"
            )
        ],
        cwd=tmp_path,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "init_from=" in lines[0] and "model.dim (32 here, 64 there)" in lines[0], lines[0]
    assert "model.memory.k_dim (8 here, 16 there)" in lines[0] and "Traceback" not in proc.stderr
    assert not list((tmp_path / "ft").glob("checkpoints/*"))


def test_init_from_refusals_are_one_line(pretrained, tmp_path):
    with pytest.raises(UserError, match=r"init_from='.*nowhere': no such run directory or checkpoint"):
        _train(tmp_path / "a", f"init_from={tmp_path / 'nowhere'}")
    with pytest.raises(UserError, match=r"config error: train.finetune='memory' is invalid: full, or set init_from"):
        _train(tmp_path / "b", "train.finetune=memory")


def test_init_from_an_export_takes_its_weights_config_and_tokenizer(pretrained, tmp_path):
    """`init_from=EXPORT` (pkmlm-export's model.safetensors + config.json + tokenizer.json): the
    model starts with the exported weights (same logits as the source run), the export's tokenizer,
    and a model mismatch against its config.json is still one line."""
    from pkmlm.parallel.env import DistInfo
    from pkmlm.run import export_run
    from pkmlm.train.setup import build_model, init_source, model_config_for

    source = load_run(pretrained)
    export = export_run(source, tmp_path / "export")
    cfg = OmegaConf.to_object(_compose(f"init_from={export}"))
    found, meta = init_source(cfg, None, DistInfo())
    assert found == export and meta["tokenizer"] == (pretrained / "tokenizer.json").read_text()
    model_cfg = model_config_for(cfg.model, source.tokenizer.get_vocab_size())
    model = build_model(cfg, model_cfg, init_from=found).eval()
    ids_BT = torch.randint(0, model_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the model returns (logits, aux)
        logits_BTV = source.model(ids_BT)[0]
        assert torch.equal(model(ids_BT)[0], logits_BTV)
        fresh = build_model(cfg, model_cfg).eval()  # the seeded init alone: different logits
        assert not torch.equal(fresh(ids_BT)[0], logits_BTV)

    run_dir = tmp_path / "ft"  # through the loop: a fresh run of its own from the export
    _train(run_dir, f"init_from={export}", "train.max_steps=1", "checkpoint.interval=1")
    assert store.read_meta(store.latest_valid(run_dir / "checkpoints"))["init_from"] == str(export)
    assert (run_dir / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()

    with pytest.raises(UserError) as refused:
        _train(tmp_path / "bad", f"init_from={export}", "model.dim=32", "model.memory.k_dim=8")
    assert len(str(refused.value).splitlines()) == 1 and "model.dim (32 here, 64 there)" in str(refused.value)
    (export / "config.json").unlink()
    with pytest.raises(UserError, match=r"init_from='.*export': an export without config.json"):
        _train(tmp_path / "c", f"init_from={export}")


def test_forgetting_facts_sets_are_disjoint_people_with_the_same_values(tmp_path):
    """The benchmark's set B is new people stating facts from A's value sets (no new values)."""
    import json

    from pkmlm.knowledge.forgetting import split_facts

    a, b = split_facts(tmp_path, people=6, seed=3, templates=2)

    def rows(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    qa = {"A": rows(a / "qa.jsonl"), "B": rows(b / "qa.jsonl")}
    people = {name: {q["person"] for q in rows} for name, rows in qa.items()}
    assert len(people["A"]) == len(people["B"]) == 6 and not people["A"] & people["B"]
    bios = {"A": rows(a / "bios.jsonl"), "B": rows(b / "bios.jsonl")}
    assert all(len(docs) == 12 and {d["person"] for d in docs} == people[name] for name, docs in bios.items())
    all_qa = rows(tmp_path / "all" / "qa.jsonl")
    assert sorted(map(json.dumps, qa["A"] + qa["B"])) == sorted(map(json.dumps, all_qa))
    assert {q["n_values"] for q in qa["A"]} == {q["n_values"] for q in qa["B"]}
