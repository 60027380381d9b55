"""Tokenizer: exact byte-level round trip, fixed EOS, content-hash cache, loading a tokenizer.json."""

from __future__ import annotations

import json
import random

import pytest

from pkmlm.data.config import DataConfig
from pkmlm.data.loader import load_or_train_tokenizer, resolve_data
from pkmlm.data.mixing import DataPlan
from pkmlm.data.tokenizer import EOS_TOKEN, encode_documents, eos_id, train_bpe
from pkmlm.errors import ConfigError, DataError

GIVEN = DataPlan(sources=[])  # the plan does not matter when data.tokenizer names a file

WORDS = "the of and memory key value product layer model token north river city music naïve café".split()
ROUND_TRIP = [
    "plain ASCII, with punctuation: (a+b)*c = 42; tabs\tand\nnewlines\n\n",
    "  leading and trailing spaces  ",
    "accents: élève, façade, Ångström, Øresund, naïve",
    "CJK: 東京は日本の首都です。中文测试。한국어",
    "emoji: 🎉👩‍🔬🇫🇷 and a zero-width joiner",
    "control \x00\x01\x7f and the literal <|endoftext|> inside a document",
    "",
]


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return train_bpe(corpus(), vocab_size=400)


def test_round_trip_is_exact(tok):
    for text in ROUND_TRIP:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_eos_has_id_zero_and_is_never_produced_by_text(tok):
    assert tok.token_to_id(EOS_TOKEN) == 0 == eos_id(tok)
    ids = encode_documents(tok, ["before <|endoftext|> after"])[0]
    assert 0 not in ids  # only the packer inserts EOS
    assert tok.decode(ids) == "before <|endoftext|> after"


def test_merges_learned_and_vocab_bounded(tok):
    assert 257 < tok.get_vocab_size() <= 400
    assert len(tok.encode("memory", add_special_tokens=False).ids) == 1


def test_encode_documents_matches_encode(tok):
    texts = ROUND_TRIP + corpus(20, seed=1)
    assert encode_documents(tok, texts) == [tok.encode(t, add_special_tokens=False).ids for t in texts]


def test_cache_miss_then_hit_and_vocab_size_in_key(tmp_path):
    files = [write_corpus(tmp_path / "c.jsonl", corpus())]
    cfg = DataConfig(files=files, vocab_size=350, tokenizer_docs=200)
    cache = str(tmp_path / "cache")

    tok1, info1 = load_or_train_tokenizer(cfg, resolve_data(cfg), cache)
    assert info1["source"] == "trained"
    assert info1["path"] == f"{tmp_path}/cache/tokenizers/{info1['hash'][:16]}.json"
    assert info1["vocab_size"] == tok1.get_vocab_size()

    tok2, info2 = load_or_train_tokenizer(cfg, resolve_data(cfg), cache)
    assert info2["source"] == "cache" and info2["path"] == info1["path"]
    assert tok2.get_vocab() == tok1.get_vocab()
    assert encode_documents(tok2, ROUND_TRIP) == encode_documents(tok1, ROUND_TRIP)
    assert 0 not in encode_documents(tok2, ["<|endoftext|>"])[0]  # runtime flag restored on load

    cfg360 = DataConfig(files=files, vocab_size=360, tokenizer_docs=200)
    _, info3 = load_or_train_tokenizer(cfg360, resolve_data(cfg360), cache)
    assert info3["source"] == "trained" and info3["hash"] != info1["hash"]

    # Only the first tokenizer_docs documents count: appending documents keeps the cache hit.
    write_corpus(tmp_path / "c.jsonl", corpus() + ["new words entirely"] * 5)
    _, info4 = load_or_train_tokenizer(cfg, resolve_data(cfg), cache)
    assert info4["source"] == "cache" and info4["hash"] == info1["hash"]


def test_load_given_tokenizer_file(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded, info = load_or_train_tokenizer(DataConfig(tokenizer=str(path)), GIVEN, str(tmp_path / "cache"))
    assert info == {"source": "file", "path": str(path), "hash": None, "vocab_size": tok.get_vocab_size()}
    assert encode_documents(loaded, ROUND_TRIP) == encode_documents(tok, ROUND_TRIP)


def test_bad_tokenizer_paths_name_the_key(tmp_path, tok):
    with pytest.raises(DataError, match=r"data\.tokenizer=.*nope\.json.*no such file"):
        load_or_train_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.json")), GIVEN, str(tmp_path))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(DataError, match=r"data\.tokenizer=.*garbage\.json.*not a valid tokenizer\.json"):
        load_or_train_tokenizer(DataConfig(tokenizer=str(garbage)), GIVEN, str(tmp_path))
    no_eos = json.loads(tok.to_str())
    no_eos["added_tokens"] = []
    no_eos["model"]["vocab"].pop(EOS_TOKEN)
    path = tmp_path / "no_eos.json"
    path.write_text(json.dumps(no_eos))
    with pytest.raises(DataError, match=r"data\.tokenizer=.*no_eos\.json.*<\|endoftext\|>"):
        load_or_train_tokenizer(DataConfig(tokenizer=str(path)), GIVEN, str(tmp_path))


def test_bad_training_settings(tmp_path):
    files = [write_corpus(tmp_path / "c.jsonl", corpus(10))]
    with pytest.raises(ConfigError, match=r"data\.vocab_size=100"):
        resolve_data(DataConfig(files=files, vocab_size=100))  # the data boundary checks every value
    empty = DataConfig(files=[write_corpus(tmp_path / "empty.jsonl", [""])], vocab_size=300)
    with pytest.raises(DataError, match="no document to train the tokenizer"):
        load_or_train_tokenizer(empty, resolve_data(empty), str(tmp_path))
