"""Engram (issue 23: pkmlm/model/variants/engram.py) through the training loop: `memory=engram`
beside a product-key memory trains to a finite loss with lazy Adam row updates, its usage metrics
in the evaluation rows, the run's tokenizer compression saved in the run directory and carried by
the checkpoints, resumes bitwise; a model built from the config alone (as eval, export, inspect,
the harness and generate build it) gives the run's logits from its checkpoint; the HF export
refuses it in one line. Tiny sizes (tests/helpers.py TINY), a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import read_rows, train_in_process

from pkmlm.checkpoint import store
from pkmlm.checkpoint.hf_export import check_hf_exportable
from pkmlm.config import register_configs
from pkmlm.data.tokenizer import eos_id, tokenizer_from_str
from pkmlm.errors import UserError
from pkmlm.run import load_run

register_configs()

# Engram beside layer 0 and a product-key memory in layer 1 (TINY's): both kinds of table in one model.
ENGRAM = (
    "memory=engram",
    "model.memory.layers=[1]",
    "model.memory.engram_layers=[0]",
    "model.memory.engram_heads=2",
    "model.memory.engram_embed_dim=32",
    "model.memory.engram_table_size=61",
    "optim.sparse_values=true",
)
STEPS = ("train.max_steps=6", "eval.interval=3", "checkpoint.interval=100")


def _model_state(run_dir: Path) -> dict:
    return store.read(store.latest_valid(run_dir / "checkpoints"))["model"]


@pytest.mark.usefixtures("one_thread")
def test_engram_trains_with_its_metrics_and_compression_and_resumes_bitwise(tmp_path):
    summary = train_in_process(tmp_path / "straight", *ENGRAM, *STEPS)
    train_in_process(tmp_path / "split", *ENGRAM, *STEPS, "train.stop_at_step=3")
    train_in_process(tmp_path / "split", *ENGRAM, *STEPS)  # resume=auto from step 3
    assert summary["stopped_by"] == "max_steps" and summary["step"] == 6
    rows = read_rows(tmp_path / "straight")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 6 and all(isinstance(v, float) for v in losses)  # null = non-finite
    keys = ("train/loss", "val/loss", "memory/layer0/engram/usage", "memory/layer0/engram/gate_mean")
    for key in (*keys, "train/memory/layer0/engram/usage", "train/memory/layer0/engram/order3/gini"):
        a = {r["step"]: r[key] for r in rows if key in r}
        b = {r["step"]: r[key] for r in read_rows(tmp_path / "split") if key in r}
        assert a and a == b, key  # float equality: bitwise
    val = [r for r in rows if "val/loss" in r][-1]
    for stat in ("usage", "order2/usage", "order3/usage", "gini", "order3/gini", "kl_count"):
        assert 0 <= val[f"memory/layer0/engram/{stat}"] <= (1 if "usage" in stat or "gini" in stat else 20)
    assert 0 < val["memory/layer0/engram/gate_mean"] < 1
    # Training rows: the reads of the window's steps (one step per row here: B x T tokens x R rows).
    first = next(r for r in rows if "train/loss" in r)
    assert 0 < first["train/memory/layer0/engram/usage"] <= 1 and 0 < first["train/memory/layer0/engram/gate_mean"] < 1
    assert all("train/memory/layer0/engram/usage" in r for r in rows if "train/loss" in r)
    assert 0 < val["memory/layer1/usage"] <= 1  # the product-key memory's keys, beside it, unchanged
    a, b = _model_state(tmp_path / "straight"), _model_state(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The tokenizer compression: saved beside the run's tokenizer, installed, carried by the checkpoint.
    run_dir = tmp_path / "straight"
    saved = json.loads((run_dir / "engram_compression.json").read_text())
    tok = tokenizer_from_str((run_dir / "tokenizer.json").read_text())
    canonical = a["blocks.0.engram.canonical_ids"]
    assert canonical[: len(saved["canonical_ids"])].tolist() == saved["canonical_ids"]
    assert saved["canonical_size"] < tok.get_vocab_size()  # case and spaces merged
    assert int(a["blocks.0.engram.eot_id"]) == eos_id(tok)
    # Lazy Adam moved only the table rows some step read: the rest are at their init.
    fresh = train_in_process(tmp_path / "zero", *ENGRAM, "train.max_steps=1", "eval.interval=100")
    assert fresh["step"] == 1
    init = _model_state(tmp_path / "zero")["blocks.0.engram.tables.weight"]
    moved = (a["blocks.0.engram.tables.weight"] != init).any(1)
    assert 0 < int(moved.sum()) < moved.numel()


@pytest.mark.usefixtures("one_thread")
def test_a_model_built_from_the_config_alone_loads_the_run_and_hf_export_refuses_it(tmp_path):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, *ENGRAM, "train.max_steps=2", "eval.interval=100", "checkpoint.interval=2")
    run = load_run(run_dir)  # what pkmlm-eval, -export, -inspect, the harness and generate do
    engram = run.model.side_layers()["blocks.0.engram"]
    saved = json.loads((run_dir / "engram_compression.json").read_text())
    assert engram.canonical_ids[: len(saved["canonical_ids"])].tolist() == saved["canonical_ids"]
    # Incremental decoding through the KV cache equals the full forward (Engram's decode state included).
    idx = torch.randint(1, 300, (2, 12))
    idx[0, 4] = int(engram.eot_id)
    with torch.no_grad():
        full = run.model(idx)[0]
        cache = run.model.new_cache(2, 12)
        steps = [run.model(idx[:, :5], cache=cache)[0]] + [
            run.model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    for memory in (run.config["model"]["memory"], {"layers": [], "engram_layers": [1]}):  # with or without PKM
        with pytest.raises(UserError, match=r"--format hf:.*engram: engram_layers") as info:
            check_hf_exportable({"memory": memory})
        assert "\n" not in str(info.value)
