"""Pre-tokenized shards: exact round trip, dtype choice, window order, sharding and resume, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_fixtures import make_docs, write_texts_jsonl
from pkmlm.data.config import DataConfig
from pkmlm.data.loader import validation_batches
from pkmlm.data.mixing import resolve_sources
from pkmlm.data.prepared import PreparedBatches, load_index, open_shards, prepare, token_dtype
from pkmlm.data.tokenizer import encode_documents, train_bpe
from pkmlm.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return train_bpe(make_docs(300, seed=99) + ["VAL"], vocab_size=320)


def write_prepared(tmp_path, tok, n_docs=60, shard_tokens=400, name="prep", **cfg_kw):
    texts = [f"VAL {i}" for i in range(3)] + make_docs(n_docs)
    files = [write_texts_jsonl(tmp_path / f"{name}.jsonl", texts)]
    cfg = DataConfig(files=files, val_docs=3, seq_len=8, encode_batch_docs=7, **cfg_kw)
    out = str(tmp_path / name)
    index = prepare(cfg, resolve_sources(cfg), tok, out, shard_tokens=shard_tokens)
    return cfg, out, index, texts


def test_round_trip_is_exact(tmp_path, tok):
    cfg, out, index, texts = write_prepared(tmp_path, tok)
    assert index["dtype"] == "uint16" and index["eos_id"] == 0 and len(index["splits"]["train"]) > 1
    shards = open_shards(out, "train")
    assert all(s.dtype == np.uint16 and s[0] == 0 for s in shards)  # each shard starts with EOS
    # Concatenated, the shards hold every training document once, in order, each followed by EOS.
    tokens = [t for s in shards for t in s[1:].tolist()]
    expected = [t for ids in encode_documents(tok, texts[3:]) for t in ids + [0]]
    assert tokens == expected
    assert index["documents"] == {"val": 3, "train": 60}
    # The validation split gives exactly the batches packed from the text.
    prepared_cfg = DataConfig(files=[], prepared=out, seq_len=8)
    got = validation_batches(prepared_cfg, None, tok, batch_size=4)
    want = validation_batches(cfg, None, tok, batch_size=4)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    saved = open(os.path.join(out, "tokenizer.json")).read()
    assert json.loads(saved)["model"]["vocab"] == json.loads(tok.to_str())["model"]["vocab"]


def test_vocab_over_65536_is_uint32(tmp_path, tok):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    big = train_bpe(make_docs(50, seed=1), vocab_size=300)
    big.add_tokens([f"<extra{i}>" for i in range(65536)])
    ids_above = [65_000 + i for i in range(300)]
    cfg, out, index, _ = write_prepared(tmp_path, big, n_docs=5, name="big")
    assert index["dtype"] == "uint32" and open_shards(out, "train")[0].dtype == np.uint32
    # ids above 2^16 survive the round trip
    files = [write_texts_jsonl(tmp_path / "hi.jsonl", ["a", " ".join(f"<extra{i}>" for i in range(65000, 65300))])]
    cfg = DataConfig(files=files, val_docs=1, seq_len=8)
    prepare(cfg, resolve_sources(cfg), big, str(tmp_path / "hi"))
    stored = open_shards(str(tmp_path / "hi"), "train")[0].tolist()
    assert stored[1:-1] == big.encode(" ".join(f"<extra{i}>" for i in range(65000, 65300))).ids
    assert max(stored) >= max(ids_above) - 300


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_ranks_take_disjoint_complete_windows_each_epoch(tmp_path, tok, order):
    cfg, out, _, _ = write_prepared(tmp_path, tok)
    train_cfg = DataConfig(files=[], prepared=out, seq_len=8, prepared_order=order)
    shards = open_shards(out, "train")
    all_windows = sorted(tuple(s[k * 8 : k * 8 + 9].tolist()) for s in shards for k in range((len(s) - 1) // 8))
    per_rank = []
    for rank in range(2):
        b = PreparedBatches(train_cfg, out, batch_size=1, seed=0, rank=rank, world_size=2)
        rows = []
        while b.epoch == 0:
            rows.append(tuple(next(b)[0].tolist()))
        per_rank.append(rows[:-1])  # the last row belongs to epoch 1
    assert sorted(per_rank[0] + per_rank[1]) == all_windows
    if order == "sequential":
        assert per_rank[0] == [w for w in per_rank[0]]  # in shard order
        first = [tuple(shards[0][k * 8 : k * 8 + 9].tolist()) for k in range(0, 4, 2)]
        assert per_rank[0][:2] == first
    else:
        b = PreparedBatches(train_cfg, out, batch_size=1, seed=0)
        first_epoch = [tuple(next(b)[0].tolist()) for _ in range(len(all_windows))]
        second_epoch = [next(b)[0].tolist() for _ in range(len(all_windows) - 5)]
        assert first_epoch != sorted(first_epoch) and sorted(first_epoch) == all_windows
        assert tuple(second_epoch[0]) not in all_windows or second_epoch[:10] != [list(w) for w in first_epoch[:10]]


def test_resume_is_bit_identical_across_epochs(tmp_path, tok):
    cfg, out, _, _ = write_prepared(tmp_path, tok)
    train_cfg = DataConfig(files=[], prepared=out, seq_len=8)
    reference = PreparedBatches(train_cfg, out, batch_size=5, seed=3)
    expected = [next(reference) for _ in range(40)]
    assert reference.epoch >= 1
    got, run = [], PreparedBatches(train_cfg, out, batch_size=5, seed=3)
    for stop in (3, 17, 29, 40):
        while len(got) < stop:
            got.append(next(run))
        state = json.loads(json.dumps(run.state_dict()))
        run = PreparedBatches(train_cfg, out, batch_size=5, seed=3)
        run.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and got[0].dtype == torch.int64
    other = PreparedBatches(DataConfig(files=[], prepared=out, seq_len=4), out, batch_size=5, seed=3)
    with pytest.raises(DataError, match="seq_len was 8, now 4"):
        other.load_state_dict(state)


def test_damaged_or_missing_directory_is_a_data_error(tmp_path, tok):
    with pytest.raises(DataError, match=r"data\.prepared=.*no index\.json.*pkmlm-prepare"):
        load_index(str(tmp_path / "nothing"))
    _, out, index, _ = write_prepared(tmp_path, tok)
    with open(os.path.join(out, index["splits"]["train"][0]["file"]), "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"shard train_00000\.bin is missing or not \d+ bytes"):
        load_index(out)


def test_cli_prepare_then_train_and_eval(tmp_path):
    texts = make_docs(120)
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl.gz", texts, compress=True)
    env = {**os.environ, "PKMLM_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    common = [f"data.files=[{corpus}]", "data.vocab_size=300", "data.tokenizer_docs=50", "data.val_docs=4"]
    result = subprocess.run([sys.executable, "-m", "pkmlm.cli.prepare", *common, "out=prep"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["documents"] == {"val": 4, "train": 116} and summary["dtype"] == "uint16"
    again = subprocess.run([sys.executable, "-m", "pkmlm.cli.prepare", *common, "out=prep"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists and is not an empty directory" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    tiny = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "model.memory.layers=[0]",
            "model.memory.n_keys=8", "model.memory.heads=1", "model.memory.knn=2", "model.memory.k_dim=8",
            "data.seq_len=16", "train.batch_size=4", "train.max_steps=3", "eval.interval=3",
            "logging.wandb.mode=disabled", "logging.progress=false", "hydra.run.dir=run"]
    train = subprocess.run([sys.executable, "-m", "pkmlm.cli.train", "data=prepared", "data.prepared=prep", *tiny],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/ppl" in r for r in rows) and rows[-1]["step"] == 3
    ev = subprocess.run([sys.executable, "-m", "pkmlm.cli.eval", "checkpoint=run"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    val_row = [r for r in rows if "val/ppl" in r][-1]
    assert out["tokens"] == val_row["val/tokens"] and abs(out["ppl"] - val_row["val/ppl"]) < 1e-3 * val_row["val/ppl"]
