"""Pre-tokenized shards: exact round trip, dtype choice, window order, sharding and resume, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import make_docs, write_parquet, write_texts_jsonl

from pkmlm.cli.prepare import PrepareProgress
from pkmlm.data.config import DataConfig, SourceConfig
from pkmlm.data.loader import resolve_data, validation_batches
from pkmlm.data.mixing import resolve_sources
from pkmlm.data.prepared import PreparedBatches, estimate, load_index, open_shards, partial_dir, prepare, token_dtype
from pkmlm.data.tokenizer import encode_documents, load_tokenizer, train_bpe
from pkmlm.errors import DataError


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
    got = validation_batches(prepared_cfg, resolve_data(prepared_cfg), tok, batch_size=4)
    want = validation_batches(cfg, resolve_data(cfg), tok, batch_size=4)
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
    common = [f"data.files=[{corpus}]", "data.vocab_size=300", "data.tokenizer_docs=50", "data.val_docs=4"]
    result = run_cli("pkmlm.cli.prepare", [*common, "out=prep"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["documents"] == {"val": 4, "train": 116} and summary["dtype"] == "uint16"
    again = run_cli("pkmlm.cli.prepare", [*common, "out=prep"], tmp_path, timeout=120)
    assert again.returncode == 2 and "exists and is not an empty directory" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    tiny = [
        "model.dim=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.max_seq_len=32",
        "model.memory.layers=[0]",
        "model.memory.n_keys=8",
        "model.memory.heads=1",
        "model.memory.knn=2",
        "model.memory.k_dim=8",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.max_steps=3",
        "eval.interval=3",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        "hydra.run.dir=run",
    ]
    train = run_cli("pkmlm.cli.train", ["data=prepared", "data.prepared=prep", *tiny], tmp_path, timeout=300)
    assert train.returncode == 0, train.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/ppl" in r for r in rows) and rows[-1]["step"] == 3
    ev = run_cli("pkmlm.cli.eval", ["checkpoint=run"], tmp_path, timeout=300)
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    val_row = [r for r in rows if "val/ppl" in r][-1]
    assert out["tokens"] == val_row["val/tokens"] and abs(out["ppl"] - val_row["val/ppl"]) < 1e-3 * val_row["val/ppl"]


# ------------------------------------------------------------------------------------------------
# Resumable writing (issue 11): an interrupted prepare continues from its last complete shard


def mixed_cfg(tmp_path, **kw):
    """Two JSON-lines sources mixed 2:1, with deduplication: the reading position is more than a count."""
    a = write_texts_jsonl(tmp_path / "a.jsonl.gz", make_docs(150, seed=1, prefix="a") * 2, compress=True)
    b = write_texts_jsonl(tmp_path / "b.jsonl", make_docs(90, seed=2, prefix="b"))
    sources = [SourceConfig(name="a", files=[a], weight=2.0), SourceConfig(name="b", files=[b])]
    return DataConfig(files=[], sources=sources, val_docs=3, seq_len=8, encode_batch_docs=5, dedup_window=500, **kw)


def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("*.bin"))}


class Interrupt:
    """A progress callback that stops the run (as Ctrl-C would) once `after` shards have closed
    and the next shard is part-written."""

    def __init__(self, after):
        self.after, self.closed, self.sizes = after, 0, []

    def __call__(self, split, tokens, shard):
        if split != "train":
            return
        if shard is not None:
            self.closed += 1
            self.sizes.append(shard["tokens"])
        elif self.closed >= self.after and tokens > sum(self.sizes):
            raise KeyboardInterrupt


@pytest.mark.parametrize("after", [0, 1, 3])
def test_interrupted_prepare_continues_to_the_same_bytes(tmp_path, tok, after):
    cfg = mixed_cfg(tmp_path)
    whole = prepare(cfg, resolve_sources(cfg), tok, str(tmp_path / "whole"), shard_tokens=1024)
    assert whole["resumed_shards"] == 0 and len(whole["splits"]["train"]) > 4
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, resolve_sources(cfg), tok, out, shard_tokens=1024, progress=Interrupt(after))
    assert not os.path.exists(out) and os.path.isfile(os.path.join(partial_dir(out), "progress.json"))
    again = prepare(cfg, resolve_sources(cfg), tok, out, shard_tokens=1024)
    assert again["resumed_shards"] == after and not os.path.exists(partial_dir(out))
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert again["splits"] == whole["splits"] and again["skipped"] == whole["skipped"]
    assert again["skipped"]["a"]["duplicate"] == 150  # every repeat of a's 150 documents (held-out ones too)
    assert load_index(out)["tokens"] == whole["tokens"]


def test_interrupted_prepare_refuses_other_settings(tmp_path, tok):
    cfg = mixed_cfg(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, resolve_sources(cfg), tok, out, shard_tokens=1024, progress=Interrupt(1))
    other = mixed_cfg(tmp_path, min_chars=5)
    with pytest.raises(
        DataError,
        match=r"interrupted pkmlm-prepare with other settings \(data\.min_chars was 0, "
        r"now 5\); rerun it with its settings",
    ):
        prepare(other, resolve_sources(other), tok, out, shard_tokens=1024)
    with pytest.raises(DataError, match=r"shard_tokens was 1024, now 2048"):
        prepare(cfg, resolve_sources(cfg), tok, out, shard_tokens=2048)
    # A directory named like the partial one that is not ours is never removed.
    foreign = tmp_path / "foreign"
    (tmp_path / "foreign.partial").mkdir()
    (tmp_path / "foreign.partial" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"foreign\.partial exists and was not written by pkmlm-prepare"):
        prepare(cfg, resolve_sources(cfg), tok, str(foreign))
    assert (tmp_path / "foreign.partial" / "keep.txt").read_text() == "mine"


def test_hub_source_prepares_and_resumes_through_datasets_streaming(tmp_path, tok):
    """A Hub source read by the same `datasets.load_dataset(..., streaming=True)` call, on a local
    directory (the Hub is unreachable here): interrupted and continued from the dataset's own state."""
    repo = tmp_path / "hub_dataset"
    repo.mkdir()
    texts = make_docs(240, seed=5)
    write_texts_jsonl(repo / "part-0.jsonl", texts[:130])
    write_texts_jsonl(repo / "part-1.jsonl", texts[130:])
    cfg = DataConfig(
        files=[],
        sources=[SourceConfig(name="hub", hub=str(repo), split="train")],
        val_docs=3,
        seq_len=8,
        encode_batch_docs=5,
    )
    prepare(cfg, resolve_sources(cfg), tok, str(tmp_path / "whole"), shard_tokens=1024)
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, resolve_sources(cfg), tok, out, shard_tokens=1024, progress=Interrupt(2))
    again = prepare(cfg, resolve_sources(cfg), tok, out, shard_tokens=1024)
    assert again["resumed_shards"] == 2 and again["documents"] == {"val": 3, "train": 237}
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")


def test_max_tokens_stops_at_the_first_chunk_past_it(tmp_path, tok):
    cfg = mixed_cfg(tmp_path)
    index = prepare(cfg, resolve_sources(cfg), tok, str(tmp_path / "out"), shard_tokens=1024, max_tokens=2000)
    assert index["stopped_by"] == "max_tokens" and 2000 <= index["tokens"]["train"] < 2000 + 5 * 60
    complete = prepare(cfg, resolve_sources(cfg), tok, str(tmp_path / "all"), shard_tokens=1024)
    assert complete["stopped_by"] == "end of sources"
    # the same documents, in the same order, as far as it went
    short, full = shard_bytes(tmp_path / "out"), shard_bytes(tmp_path / "all")
    last = max(name for name in short if name.startswith("train"))
    assert all(full[name] == data for name, data in short.items() if name != last)
    assert full[last].startswith(short[last])


def test_estimate_is_stated_before_work_and_close(tmp_path, tok):
    texts = make_docs(3000, seed=7)
    for name, path in (
        ("jsonl.gz", write_texts_jsonl(tmp_path / "c.jsonl.gz", texts, compress=True)),
        ("parquet", write_parquet(tmp_path / "c.parquet", texts, row_group_size=500)),
    ):
        cfg = DataConfig(files=[path], val_docs=10, seq_len=8)
        plan = estimate(cfg, resolve_sources(cfg), tok)
        actual = prepare(cfg, resolve_sources(cfg), tok, str(tmp_path / name))["tokens"]["train"]
        assert abs(plan["train_tokens"] - actual) < 0.15 * actual, (name, plan, actual)
        assert plan["disk_bytes"] == 2 * plan["train_tokens"]  # uint16
    assert estimate(cfg, resolve_sources(cfg), tok, max_tokens=1000)["train_tokens"] == 1000


def test_progress_lines_without_a_terminal():
    out = io.StringIO()
    progress = PrepareProgress(total=10_000, file=out, tty=False, interval_s=0)
    progress("val", 50, None)
    progress("train", 4_000, None)
    progress("train", 5_000, {"file": "train_00000.bin"})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("pkmlm-prepare: continuing an interrupted run: 4,000 training tokens")
    assert "train 5.0k tokens (~50% of ~10.0k), 1 shards closed" in lines[-1] and "tok/s" in lines[-1]


# ------------------------------------------------------------------------------------------------
# Damaged shards and indexes (issue 13): one line, before any batch


def rewrite_index(out, change):
    path = Path(out) / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def test_in_range_corruption_is_refused_by_its_checksum(tmp_path, tok):
    _, out, index, _ = write_prepared(tmp_path, tok)
    shard = Path(out) / index["splits"]["train"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # a flipped bit: still a valid id below the vocabulary size
    shard.write_bytes(bytes(data))
    train_cfg = DataConfig(files=[], prepared=out, seq_len=8)
    with pytest.raises(
        DataError,
        match=r"shard train_00001\.bin does not match its SHA-256 in index\.json "
        r"\(the file is damaged\); prepare it again",
    ):
        PreparedBatches(train_cfg, out, batch_size=2, seed=0)
    load_index(out)  # sizes are fine: only the checksum tells


def test_out_of_range_ids_are_refused_up_front(tmp_path, tok):
    """Originally an IndexError in the embedding at step 1; now one line when the shards are opened."""
    _, out, index, _ = write_prepared(tmp_path, tok)
    shard = os.path.join(out, index["splits"]["train"][0]["file"])
    ids = np.fromfile(shard, dtype="<u2")
    ids[7] = 65535
    ids.tofile(shard)
    digest = hashlib.sha256(Path(shard).read_bytes()).hexdigest()
    rewrite_index(out, lambda i: i["splits"]["train"][0].update(sha256=digest))  # a consistent-looking index
    with pytest.raises(
        DataError,
        match=r"shard train_00000\.bin holds token id 65535, outside the vocabulary of "
        rf"{tok.get_vocab_size()} tokens",
    ):
        PreparedBatches(DataConfig(files=[], prepared=out, seq_len=8), out, batch_size=2, seed=0)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text("[]"), r"not a valid pkmlm-prepare index \(a JSON list, not an object\)"),
        (lambda p: p.write_text('{"format": "pkmlm-prepared/2"'), r"cannot be read \(Expecting"),
        (lambda p: p.write_bytes(b"\xff\xfe"), r"cannot be read"),
        (lambda p: rewrite_index(str(p.parent), lambda i: i.pop("splits")), r"splits=None: expected an object"),
        (lambda p: rewrite_index(str(p.parent), lambda i: i.update(vocab_size="320")), r"vocab_size='320'"),
        (
            lambda p: rewrite_index(str(p.parent), lambda i: i["splits"]["train"][0].update(file="../../etc/passwd")),
            r"splits\.train\[0\]\.file='\.\./\.\./etc/passwd': expected train_NNNNN\.bin",
        ),
        (
            lambda p: rewrite_index(str(p.parent), lambda i: i["splits"]["val"][0].pop("sha256")),
            r"splits\.val\[0\]\.sha256=None: expected 64 hex digits",
        ),
        (lambda p: rewrite_index(str(p.parent), lambda i: i.update(eos_id=10**6)), r"eos_id=1000000"),
    ],
)
def test_malformed_index_is_one_line(tmp_path, tok, damage, message):
    _, out, _, _ = write_prepared(tmp_path, tok)
    damage(Path(out) / "index.json")
    with pytest.raises(DataError, match=message) as err:
        load_index(out)
    assert "\n" not in str(err.value) and "prepare it again" in str(err.value)


def run_cli(module, args, tmp_path, timeout=180, **env):
    """A pkmlm CLI in a subprocess in `tmp_path`, with its own tokenizer cache there."""
    env = {**os.environ, "PKMLM_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true", **env}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_exit_2(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_cli_damaged_shards_and_index_exit_2_before_step_1(tmp_path, tok):
    _, out, index, _ = write_prepared(tmp_path, tok)
    tiny = [
        "model.dim=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.max_seq_len=32",
        "model.memory.layers=[]",
        "data.seq_len=8",
        "train.batch_size=2",
        "train.max_steps=2",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        "hydra.run.dir=run",
    ]
    shard = os.path.join(out, index["splits"]["train"][0]["file"])
    ids = np.fromfile(shard, dtype="<u2")
    ids[3] = 60000
    ids.tofile(shard)
    digest = hashlib.sha256(Path(shard).read_bytes()).hexdigest()
    rewrite_index(out, lambda i: i["splits"]["train"][0].update(sha256=digest))
    line = one_line_exit_2(run_cli("pkmlm.cli.train", ["data=prepared", f"data.prepared={out}", *tiny], tmp_path))
    assert "holds token id 60000, outside the vocabulary" in line and not (tmp_path / "run" / "metrics.jsonl").exists()
    (Path(out) / "index.json").write_text('{"format": "pkmlm-prepared/2", "splits": []}')
    line = one_line_exit_2(run_cli("pkmlm.cli.train", ["data=prepared", f"data.prepared={out}", *tiny], tmp_path))
    assert "index.json is not a valid pkmlm-prepare index" in line


def test_cli_prepare_user_errors_are_one_line(tmp_path):
    assert "out" in one_line_exit_2(run_cli("pkmlm.cli.prepare", [], tmp_path))  # was a MissingMandatoryValue traceback
    line = one_line_exit_2(run_cli("pkmlm.cli.prepare", ["data=fineweb_edu", "out=fw"], tmp_path, HF_HUB_OFFLINE="1"))
    assert "cannot open Hub dataset 'HuggingFaceFW/fineweb-edu'" in line and "not reachable" in line
    assert not (tmp_path / "fw").exists() and not (tmp_path / "fw.partial").exists()


def test_cli_prepare_hub_source_offline_on_local_files(tmp_path):
    """The CLI's Hub path (datasets streaming, the size look-up, the estimate) on a local directory."""
    repo = tmp_path / "hub_dataset"
    repo.mkdir()
    write_texts_jsonl(repo / "part-0.jsonl", make_docs(300, seed=8))
    result = run_cli(
        "pkmlm.cli.prepare",
        [
            "data.files=[]",
            f"data.sources=[{{hub: '{repo}', split: train}}]",
            "data.vocab_size=300",
            "data.tokenizer_docs=100",
            "shard_tokens=2048",
            "out=prep",
        ],
        tmp_path,
        HF_HUB_OFFLINE="1",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["documents"] == {"val": 20, "train": 280} and summary["estimated_train_tokens"] is None
    assert "is not stated up front, so tokens are counted as they come" in result.stderr
    assert load_index(str(tmp_path / "prep"))["tokens"] == summary["tokens"]


def test_cli_prepare_killed_then_rerun_continues(tmp_path, tok):
    """kill -9 in the middle of writing, then the same command: it continues from the last closed
    shard, and the shards equal an uninterrupted run's."""
    corpus = write_texts_jsonl(tmp_path / "corpus.jsonl.gz", make_docs(12000, seed=3), compress=True)
    args = [
        f"data.files=[{corpus}]",
        "data.vocab_size=300",
        "data.tokenizer_docs=200",
        "data.val_docs=4",
        "shard_tokens=1024",
        "out=prep",
    ]
    env = {**os.environ, "PKMLM_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pkmlm.cli.prepare", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = tmp_path / "prep.partial" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["train"]:
            break
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be interrupted: {err}"
    result = run_cli("pkmlm.cli.prepare", args, tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["resumed_shards"] >= 1 and summary["tokenizer"] == "interrupted run"
    assert "continuing an interrupted run" in result.stderr and "estimate: ~" in result.stderr
    # an uninterrupted run of the same settings, in process, with the directory's own tokenizer
    cfg = DataConfig(files=[corpus], vocab_size=300, tokenizer_docs=200, val_docs=4)
    same_tok = load_tokenizer(str(tmp_path / "prep" / "tokenizer.json"))
    prepare(cfg, resolve_sources(cfg), same_tok, str(tmp_path / "whole"), shard_tokens=1024)
    assert shard_bytes(tmp_path / "prep") == shard_bytes(tmp_path / "whole")
