"""Cleaning, mixing, rank x worker sharding and exact resume of the whole pipeline (workers included)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from data_fixtures import make_docs, roundtrip, stitch, write_parquet, write_texts_jsonl, write_wet

from pkmlm.data.cleaning import Cleaner
from pkmlm.data.config import DataConfig, SourceConfig
from pkmlm.data.loader import (
    TokenBatches,
    WorkerBatches,
    build_train_batches,
    load_or_train_tokenizer,
    resolve_data,
    stats_row,
    validation_batches,
)
from pkmlm.data.mixing import MixedDocuments, SourceStream, resolve_sources
from pkmlm.data.tokenizer import encode_documents
from pkmlm.errors import ConfigError, DataError


def cfg_for(files=(), **kw):
    values = dict(files=list(files), seq_len=16, val_docs=2, encode_batch_docs=4, shuffle_buffer=0)
    values.update(kw)
    return DataConfig(**values)


# ------------------------------------------------------------------------------------------------
# cleaning


def test_cleaner_nfc_length_and_windowed_dedup():
    c = Cleaner(min_chars=3, nfc=True, dedup_window=2)
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    out = [c(t) for t in ["one", decomposed, composed, "ab", "two", "three", "one", "two"]]
    # composed == NFC(decomposed): a duplicate; "one" has left the 2-document window when it returns
    assert out == ["one", composed, None, None, "two", "three", "one", "two"]
    assert c.stats == {"nfc_normalized": 1, "duplicate": 1, "too_short": 1}
    state = roundtrip(c.state_dict())  # window: one, two
    again = Cleaner(min_chars=3, nfc=True, dedup_window=2)
    again.load_state_dict(state)
    assert [again(t) for t in ["two", "one", "five"]] == [None, None, "five"]
    assert Cleaner()("x") == "x" and not Cleaner().active


def test_cleaning_in_the_stream_counts_and_holds_validation_out(tmp_path):
    texts = ["VAL a", "VAL b", "keep one", "tiny", "keep one", "keep two", "keep one"]
    files = [write_texts_jsonl(tmp_path / "c.jsonl", texts)]
    cfg = cfg_for(files, min_chars=5, dedup_window=10)
    stream = SourceStream(resolve_sources(cfg)[0], cfg)
    got = [stream.next_document() for _ in range(2)]
    assert got == ["keep one", "keep two"]
    assert stream.stats == {"too_short": 1, "duplicate": 1}
    assert stream.next_document() == "keep one" and stream.epoch == 1  # the window restarts each epoch
    assert stream.stats == {"too_short": 1, "duplicate": 2}
    assert stats_row(stream.stats)["data/skipped/duplicate"] == 2


# ------------------------------------------------------------------------------------------------
# mixing


def test_mixture_follows_weights_and_sources_cycle_independently(tmp_path):
    a = write_texts_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(50)])
    b = write_texts_jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(7)])
    cfg = cfg_for(
        sources=[SourceConfig(name="A", files=[a], weight=3.0), SourceConfig(name="B", files=[b])], val_docs=0
    )
    mix = MixedDocuments(resolve_sources(cfg), cfg, seed=0)
    docs = [mix.next_document() for _ in range(4000)]
    share_a = sum(d.startswith("a") for d in docs) / len(docs)
    assert 0.72 < share_a < 0.78  # 3:1 by documents
    per = mix.per_source()
    assert per["B"]["epoch"] > per["A"]["epoch"] > 10  # the small source repeats more often
    assert Counter(d for d in docs if d.startswith("b")).keys() == {f"b{i}" for i in range(7)}

    other_seed = MixedDocuments(resolve_sources(cfg), cfg, seed=1)
    assert [other_seed.next_document() for _ in range(200)] != docs[:200]


def test_mixture_config_errors(tmp_path):
    a = write_texts_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ConfigError, match=r"data\.files=.*\[\] when data\.sources is set"):
        resolve_sources(DataConfig(files=[a], sources=[SourceConfig(files=[a])]))
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.weight=-1\.0"):
        resolve_sources(DataConfig(files=[], sources=[SourceConfig(files=[a], weight=-1.0)]))
    with pytest.raises(ConfigError, match=r"data\.sources\[1\].*files .* or hub"):
        resolve_sources(DataConfig(files=[], sources=[SourceConfig(files=[a]), SourceConfig()]))
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.files pattern .*nothing/\*\.jsonl.* matches no file"):
        resolve_sources(DataConfig(files=[], sources=[{"files": [str(tmp_path / "nothing/*.jsonl")]}]))
    with pytest.raises(ConfigError, match=r"data\.sources\[0\].*unknown: \['wieght'\]"):
        resolve_sources(DataConfig(files=[], sources=[{"files": [a], "wieght": 2}]))


# ------------------------------------------------------------------------------------------------
# sharding: every training document read by exactly one (rank, worker)


def reader_doc_ids(windows, tok, n_docs):
    text = tok.decode(stitch(windows), skip_special_tokens=False)
    return {i for i in range(n_docs) if f"doc{i:04d}" in text}


def test_rank_x_worker_sharding_is_disjoint_and_complete(tmp_path, tok):
    n_docs = 26
    docs = make_docs(n_docs)
    # Three files of three formats, with a bad record that is also a record to shard.
    files = [
        write_texts_jsonl(tmp_path / "a.jsonl", docs[:10]),
        write_parquet(tmp_path / "b.parquet", docs[10:18]),
        write_wet(tmp_path / "c.warc.wet.gz", [(f"http://x/{i}", t) for i, t in enumerate(docs[18:])]),
    ]
    cfg = cfg_for(files, val_docs=2, num_workers=2)
    world_size, workers = 2, 2
    seen = {}
    for rank in range(world_size):
        batches = build_train_batches(
            cfg, resolve_data(cfg), tok, batch_size=2, seed=0, rank=rank, world_size=world_size
        )
        assert isinstance(batches, WorkerBatches)
        rows = {w: [] for w in range(workers)}
        for i in range(30):  # batch i comes from worker i mod 2 (the DataLoader's round-robin)
            rows[i % workers] += next(batches).tolist()
        assert batches.epoch >= 1  # every reader went through its share at least once
        batches.close()
        for w in range(workers):
            seen[(rank, w)] = reader_doc_ids(rows[w], tok, n_docs)
    readers = list(seen.values())
    assert set().union(*readers) == set(range(2, n_docs))  # complete: every training document, no validation
    for i, a in enumerate(readers):
        for b in readers[i + 1 :]:
            assert not a & b  # disjoint
    # reader slot = rank * workers + worker keeps training records slot, slot + 4, ...
    assert seen[(1, 0)] == {2 + k for k in range(2, 24, 4)}


def test_in_process_ranks_match_worker_slots(tmp_path, tok):
    files = [write_texts_jsonl(tmp_path / "a.jsonl", make_docs(17))]
    cfg = cfg_for(files, val_docs=1)
    slots = []
    for rank in range(3):
        b = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=0, rank=rank, world_size=3)
        rows = [r for _ in range(12) for r in next(b).tolist()]
        slots.append(reader_doc_ids(rows, tok, 17))
    assert slots == [set(range(1 + r, 17, 3)) for r in range(3)]


# ------------------------------------------------------------------------------------------------
# exact resume


def mixed_cfg(tmp_path, **kw):
    a = write_texts_jsonl(tmp_path / "a.jsonl.gz", make_docs(15), compress=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "doc9001 alpha"}\n{"text": broken\n{"text": "doc9002 beta beta"}\n{"text": 7}\n')
    b = write_parquet(tmp_path / "b.parquet", make_docs(6, seed=2, prefix="pq"))
    c = write_wet(tmp_path / "c.warc.wet.gz", [(f"http://w/{i}", t) for i, t in enumerate(make_docs(5, 3, "wet"))])
    sources = [
        SourceConfig(name="a", files=[a, str(bad)], weight=2.0),
        SourceConfig(name="b", files=[b]),
        SourceConfig(name="c", files=[c], weight=0.5),
    ]
    return cfg_for(sources=sources, val_docs=1, shuffle_buffer=5, dedup_window=4, min_chars=8, **kw)


@pytest.mark.parametrize("stops", [[1, 4, 9], [2, 13, 14, 30]])
def test_resume_is_bit_identical_with_mixing_cleaning_and_bad_records(tmp_path, tok, stops):
    cfg = mixed_cfg(tmp_path)
    total = stops[-1] + 5
    reference = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=3, seed=5)
    expected = [next(reference) for _ in range(total)]
    assert max(s["epoch"] for s in reference._docs.per_source().values()) >= 1  # crosses an epoch
    assert reference.stats.get("malformed_json", 0) >= 1  # bad records are part of what resumes
    got, done, run = [], 0, TokenBatches(cfg, resolve_data(cfg), tok, batch_size=3, seed=5)
    for stop in stops + [total]:
        got += [next(run) for _ in range(stop - done)]
        done = stop
        state = roundtrip(run.state_dict())
        run = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=3, seed=5)
        run.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == total
    assert run.stats == reference.stats and run.documents == reference.documents


def test_resume_with_two_workers_is_bit_identical(tmp_path, tok):
    cfg = mixed_cfg(tmp_path, num_workers=2)
    total = 16
    reference = WorkerBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=3)
    expected = [next(reference) for _ in range(total)]
    reference_stats = reference.stats
    reference.close()
    got, done = [], 0
    run = WorkerBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=3)
    for stop in (5, 8, total):  # an odd stop: the next batch is worker 1's
        got += [next(run) for _ in range(stop - done)]
        done = stop
        state = roundtrip(run.state_dict())
        run.close()
        run = WorkerBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=3)
        run.load_state_dict(state)
    run.close()
    assert len(got) == total and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert json.dumps(state)  # plain JSON
    assert sum(reference_stats.values()) > 0


def test_resume_refuses_another_worker_count(tmp_path, tok):
    cfg = mixed_cfg(tmp_path)
    batches = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=0)
    next(batches)
    workers_cfg = mixed_cfg(tmp_path, num_workers=2)
    workers = WorkerBatches(workers_cfg, resolve_data(workers_cfg), tok, batch_size=2, seed=0)
    with pytest.raises(DataError, match="data.num_workers"):
        workers.load_state_dict(batches.state_dict())


# ------------------------------------------------------------------------------------------------
# validation split and tokenizer sample over a mixture


def test_validation_is_the_first_documents_of_each_source(tmp_path, tok):
    a = write_texts_jsonl(tmp_path / "a.jsonl", ["VAL a one", "VAL a two"] + make_docs(5))
    b = write_texts_jsonl(tmp_path / "b.jsonl", ["VAL b one", "VAL b two"] + make_docs(5, seed=1))
    cfg = cfg_for(sources=[SourceConfig(files=[a]), SourceConfig(files=[b])], val_docs=2, seq_len=8)
    windows = [row for batch in validation_batches(cfg, resolve_data(cfg), tok, batch_size=4) for row in batch.tolist()]
    expected = [0] + [
        t for ids in encode_documents(tok, ["VAL a one", "VAL a two", "VAL b one", "VAL b two"]) for t in ids + [0]
    ]
    assert stitch(windows) == expected
    assert len(validation_batches(cfg, resolve_data(cfg), tok, batch_size=1, max_batches=2)) == 2
    train = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=2, seed=0)
    text = tok.decode(stitch([r for _ in range(20) for r in next(train).tolist()]), skip_special_tokens=False)
    assert "VAL" not in text


def test_tokenizer_special_tokens_and_cache_key(tmp_path):
    files = [write_texts_jsonl(tmp_path / "a.jsonl", make_docs(40))]
    cfg = DataConfig(files=files, vocab_size=300, tokenizer_docs=40)
    plain, info = load_or_train_tokenizer(cfg, resolve_data(cfg), str(tmp_path / "cache"))
    special_cfg = DataConfig(files=files, vocab_size=300, tokenizer_docs=40, special_tokens=["<|pad|>", "<|sep|>"])
    tok, special_info = load_or_train_tokenizer(special_cfg, resolve_data(special_cfg), str(tmp_path / "cache"))
    assert info["source"] == special_info["source"] == "trained" and info["hash"] != special_info["hash"]
    assert [tok.token_to_id(t) for t in ["<|endoftext|>", "<|pad|>", "<|sep|>"]] == [0, 1, 2]
    assert plain.token_to_id("<|pad|>") is None
    again = load_or_train_tokenizer(special_cfg, resolve_data(special_cfg), str(tmp_path / "cache"))
    assert again[1]["source"] == "cache"
