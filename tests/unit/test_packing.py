"""Packing, shuffle buffer and the loader: window layout, splits, bit-identical resume."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch
from conftest import WIKI as SAMPLE_WIKI
from data_fixtures import make_docs, roundtrip, stitch, write_texts_jsonl

from pkmlm.data.config import DataConfig
from pkmlm.data.loader import TokenBatches, load_or_train_tokenizer, resolve_data, validation_batches
from pkmlm.data.packing import Packer, ShuffleBuffer
from pkmlm.data.sources import expand_files
from pkmlm.data.tokenizer import encode_documents
from pkmlm.errors import DataError

WIKI = str(SAMPLE_WIKI)  # the repository's data/ (tests/conftest.py)


# ------------------------------------------------------------------------------------------------
# Packer


def test_packer_windows_overlap_and_reproduce_the_stream():
    rng = random.Random(0)
    docs = [[rng.randrange(1, 50) for _ in range(rng.randint(0, 30))] for _ in range(40)]
    packer = Packer(seq_len=8, eos_id=0)
    windows = [w for d in docs for w in packer.push(d)]
    tail = packer.flush()
    assert all(len(w) == 9 for w in windows)
    expected = [0] + [t for d in docs for t in d + [0]]  # EOS before the first and after each document
    assert stitch(windows + ([tail] if tail else [])) == expected
    assert tail is None or 2 <= len(tail) <= 9


def test_packer_long_document_and_flush():
    packer = Packer(seq_len=4, eos_id=0)
    windows = packer.push(list(range(1, 11)))  # stream 0 1..10 0: 12 tokens
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert packer.state_dict() == {"buffer": [8, 9, 10, 0]}
    assert packer.flush() == [8, 9, 10, 0]
    assert packer.flush() is None  # one or zero tokens: nothing to predict


def test_packer_state_resume():
    docs = [list(range(1, n)) for n in (3, 7, 1, 12, 5, 9)]
    full = Packer(5, 0)
    expected = [w for d in docs for w in full.push(d)]
    first = Packer(5, 0)
    got = [w for d in docs[:3] for w in first.push(d)]
    second = Packer(5, 0)
    second.load_state_dict(roundtrip(first.state_dict()))
    got += [w for d in docs[3:] for w in second.push(d)]
    assert got == expected


# ------------------------------------------------------------------------------------------------
# ShuffleBuffer


def test_shuffle_buffer_passthrough_and_permutation():
    items = [[i] for i in range(100)]
    assert [ShuffleBuffer(0, seed=1).push(x) for x in items] == items

    buf = ShuffleBuffer(10, seed=1)
    out = [y for y in (buf.push(x) for x in items) if y is not None]
    assert len(out) == 90 and len(buf) == 10
    assert sorted(out + buf.state_dict()["items"]) == items
    assert out != items[:90]

    again = ShuffleBuffer(10, seed=1)
    assert [y for y in (again.push(x) for x in items) if y is not None] == out
    other = ShuffleBuffer(10, seed=2)
    assert [y for y in (other.push(x) for x in items) if y is not None] != out


def test_shuffle_buffer_state_resume():
    items = [[i] for i in range(200)]
    ref = ShuffleBuffer(16, seed="s")
    expected = [ref.push(x) for x in items]
    first = ShuffleBuffer(16, seed="s")
    got = [first.push(x) for x in items[:77]]
    second = ShuffleBuffer(16, seed="other seed: the state overrides it")
    second.load_state_dict(roundtrip(first.state_dict()))
    got += [second.push(x) for x in items[77:]]
    assert got == expected


# ------------------------------------------------------------------------------------------------
# TokenBatches


def make_cfg(files, **overrides):
    values = dict(files=files, seq_len=16, val_docs=3, encode_batch_docs=4, shuffle_buffer=0)
    values.update(overrides)
    return DataConfig(**values)


def test_batches_shape_dtype_counters(tmp_path, tok):
    files = [write_texts_jsonl(tmp_path / "c.jsonl", make_docs(30))]
    cfg = make_cfg(files)
    batches = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=4, seed=0)
    for _ in range(3):
        batch = next(batches)
        assert batch.shape == (4, 17) and batch.dtype == torch.long
    assert batches.tokens == 3 * 4 * 16 and batches.batches == 3
    assert batches.documents > 0 and batches.epoch == 0


@pytest.mark.parametrize(
    "n_docs, shuffle_buffer, stops, epochs",
    [
        (40, 0, [1, 3], 0),  # mid-epoch, no shuffle
        (40, 8, [2, 11, 30], 1),  # mid-epoch and after an epoch boundary, shuffle on
        (6, 4, [1, 2, 4, 7], 3),  # a tiny corpus: several epochs per few batches
    ],
)
def test_resume_is_bit_identical(tmp_path, tok, n_docs, shuffle_buffer, stops, epochs):
    files = [write_texts_jsonl(tmp_path / "a.jsonl", make_docs(n_docs // 2)), str(tmp_path / "b.txt")]
    (tmp_path / "b.txt").write_text("\n\n".join(make_docs(n_docs - n_docs // 2, seed=1, prefix="txt")))
    cfg = make_cfg(files, shuffle_buffer=shuffle_buffer)
    total = stops[-1] + 6

    reference = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=3, seed=7)
    expected = [next(reference) for _ in range(total)]
    assert reference.epoch >= epochs  # the run crosses that many epoch boundaries

    run = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=3, seed=7)
    got, done = [], 0
    for stop in stops + [total]:
        got += [next(run) for _ in range(stop - done)]
        done = stop
        state = roundtrip(run.state_dict())
        run = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=3, seed=7)  # a fresh process, in effect
        run.load_state_dict(state)
    assert len(got) == total
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert (run.epoch, run.documents, run.tokens) == (reference.epoch, reference.documents, reference.tokens)


def test_shuffle_changes_order_between_epochs(tmp_path, tok):
    files = [write_texts_jsonl(tmp_path / "c.jsonl", make_docs(12))]
    cfg = make_cfg(files, val_docs=0, shuffle_buffer=6)
    batches = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=1, seed=0)
    rows = [next(batches)[0].tolist() for _ in range(120)]
    assert batches.epoch >= 3
    assert len({tuple(r) for r in rows}) > 0.5 * len(rows)  # not one epoch repeated in the same order
    assert rows[:20] != rows[-20:]


def read_training_text(batches, tok, n_windows):
    """Decoded text of the next n_windows training windows (unshuffled), overlaps removed."""
    windows = []
    while len(windows) < n_windows:
        windows += next(batches).tolist()
    return tok.decode(stitch(windows), skip_special_tokens=False)


def test_validation_docs_never_in_training(tmp_path, tok):
    val = [f"VAL{i} val val" for i in range(4)]
    train = make_docs(20)
    files = [write_texts_jsonl(tmp_path / "c.jsonl", val + train)]
    cfg = make_cfg(files, val_docs=4)
    batches = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=0)
    text = read_training_text(batches, tok, 120)
    assert batches.epoch >= 1
    assert "VAL" not in text
    assert all(f"doc{i:04d}" in text for i in range(20))


def test_ranks_read_disjoint_documents(tmp_path, tok):
    files = [write_texts_jsonl(tmp_path / "c.jsonl", make_docs(23))]
    cfg = make_cfg(files, val_docs=2)
    seen = []
    for rank in range(3):
        batches = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=0, rank=rank, world_size=3)
        text = read_training_text(batches, tok, 40)
        seen.append({i for i in range(23) if f"doc{i:04d}" in text})
    assert seen[0] == {2, 5, 8, 11, 14, 17, 20}
    assert seen[1] == {3, 6, 9, 12, 15, 18, 21}
    assert seen[2] == {4, 7, 10, 13, 16, 19, 22}


def test_empty_training_split_is_a_data_error(tmp_path, tok):
    files = [write_texts_jsonl(tmp_path / "c.jsonl", make_docs(3))]
    with pytest.raises(DataError, match=r"training split.*data\.val_docs=3.*lower data\.val_docs"):
        cfg = make_cfg(files, val_docs=3)
        next(TokenBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=0))


def test_resume_with_another_layout_is_refused(tmp_path, tok):
    files = [write_texts_jsonl(tmp_path / "c.jsonl", make_docs(10))]
    cfg, cfg8 = make_cfg(files), make_cfg(files, seq_len=8)
    batches = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=0)
    next(batches)
    other = TokenBatches(cfg8, resolve_data(cfg8), tok, batch_size=2, seed=0)
    with pytest.raises(DataError, match="seq_len was 16, now 8"):
        other.load_state_dict(batches.state_dict())


# ------------------------------------------------------------------------------------------------
# validation batches


def test_validation_batches_complete_and_deterministic(tmp_path, tok):
    val = make_docs(5, seed=3, prefix="val")
    files = [write_texts_jsonl(tmp_path / "c.jsonl", val + make_docs(10))]
    cfg = make_cfg(files, val_docs=5, seq_len=8)
    batches = validation_batches(cfg, resolve_data(cfg), tok, batch_size=3)
    again = validation_batches(cfg, resolve_data(cfg), tok, batch_size=3)
    assert len(batches) == len(again) and all(torch.equal(a, b) for a, b in zip(batches, again))

    assert all(b.dtype == torch.long for b in batches)
    assert all(b.shape == (3, 9) for b in batches[:-2])
    windows = [row for b in batches for row in b.tolist()]
    assert all(len(w) == 9 for w in windows[:-1]) and 2 <= len(windows[-1]) <= 9
    expected = [0] + [t for ids in encode_documents(tok, val) for t in ids + [0]]
    assert stitch(windows) == expected  # every validation token, in order, once

    no_val = make_cfg(files, val_docs=0)
    assert validation_batches(no_val, resolve_data(no_val), tok, batch_size=3) == []


# ------------------------------------------------------------------------------------------------
# real data


def test_wiki_smoke(tmp_path):
    files = expand_files([WIKI])
    cfg = DataConfig(files=files, vocab_size=1024, tokenizer_docs=50, seq_len=64, val_docs=1, shuffle_buffer=16)
    plan = resolve_data(cfg)
    tok, info = load_or_train_tokenizer(cfg, plan, str(tmp_path))
    assert info["source"] == "trained" and info["vocab_size"] == 1024
    train = TokenBatches(cfg, plan, tok, batch_size=4, seed=0)
    val = validation_batches(cfg, plan, tok, batch_size=4)
    batch = next(train)
    assert batch.shape == (4, 65) and int(batch.max()) < 1024
    assert len(val) >= 1 and val[0].shape[1] <= 65
    text = tok.decode(list(itertools.chain.from_iterable(val[0].tolist())))
    assert len(text) > 100
    assert Counter(batch.flatten().tolist())[0] < batch.numel() // 4  # mostly text, not EOS
