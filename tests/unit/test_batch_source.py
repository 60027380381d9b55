"""The BatchSource contract (pkmlm.data.batch_source): every training source the factory builds
(streamed, DataLoader workers, prepared shards, several data shards) satisfies it, and its
state_dict -> load_state_dict into a fresh source continues with exactly the batches of an
uninterrupted iteration. `data_input` is the one place that picks a kind of input."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from data_fixtures import make_docs, roundtrip, write_texts_jsonl

from pkmlm.data.batch_source import BatchSource, DataInput
from pkmlm.data.config import DataConfig
from pkmlm.data.loader import TextInput, TokenBatches, WorkerBatches, build_train_batches, data_input, resolve_data
from pkmlm.data.mixing import resolve_sources
from pkmlm.data.prepared import PreparedBatches, PreparedInput, prepare
from pkmlm.parallel.data_shards import DataShards, build_batches
from pkmlm.parallel.env import DistInfo

SRC = Path(__file__).resolve().parents[2] / "src" / "pkmlm"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    """A text file, and the same documents prepared as shards."""
    root = tmp_path_factory.mktemp("batch_source")
    files = [write_texts_jsonl(root / "c.jsonl", make_docs(80, seed=1))]
    text = DataConfig(files=files, seq_len=8, val_docs=2, encode_batch_docs=4, shuffle_buffer=6)
    prepare(text, resolve_sources(text), tok, str(root / "prep"), shard_tokens=300)
    return text, str(root / "prep")


def configs(corpus):
    text, prepared = corpus
    return {
        "streamed": (text, TokenBatches),
        "workers": (dataclasses.replace(text, num_workers=2), WorkerBatches),
        "prepared": (DataConfig(files=[], prepared=prepared, seq_len=8), PreparedBatches),
    }


def build(cfg, tok, shards=1):
    """The training source the trainer builds: one source, or `shards` data shards on one process."""
    plan = resolve_data(cfg)

    def make(shard, n, size):
        return build_train_batches(cfg, plan, tok, batch_size=size, seed=3, rank=shard, world_size=n)

    return build_batches(make, 4, shards, DistInfo())


def close(source):
    for s in source.shards.values() if isinstance(source, DataShards) else [source]:
        if isinstance(s, WorkerBatches):
            s.close()


@pytest.mark.parametrize("kind", ["streamed", "workers", "prepared"])
@pytest.mark.parametrize("shards", [1, 2])
def test_each_source_satisfies_the_protocol_and_resumes_exactly(corpus, tok, kind, shards):
    cfg, cls = configs(corpus)[kind]
    reference = build(cfg, tok, shards)
    assert isinstance(reference, BatchSource)
    assert isinstance(reference, DataShards if shards > 1 else cls)
    expected = [next(reference) for _ in range(7)]
    close(reference)
    assert all(b.shape == (4, 9) and b.dtype == torch.int64 for b in expected)
    assert reference.batches == 7 and reference.tokens == 7 * 4 * 8 and isinstance(reference.epoch, int)
    assert isinstance(reference.stats, dict)

    run = build(cfg, tok, shards)
    got = [next(run) for _ in range(3)]
    state = roundtrip(run.state_dict())  # plain JSON, as a checkpoint stores it
    close(run)
    resumed = build(cfg, tok, shards)
    resumed.load_state_dict(state)
    assert (resumed.batches, resumed.tokens) == (3, 3 * 4 * 8)
    got += [next(resumed) for _ in range(4)]  # iter(source) is the source itself
    close(resumed)
    assert iter(resumed) is resumed
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_data_input_picks_the_kind_and_each_satisfies_its_protocol(corpus, tok):
    text, prepared = configs(corpus)["streamed"][0], configs(corpus)["prepared"][0]
    text_input, prepared_input = data_input(resolve_data(text)), data_input(resolve_data(prepared))
    assert isinstance(text_input, TextInput) and isinstance(prepared_input, PreparedInput)
    assert isinstance(text_input, DataInput) and isinstance(prepared_input, DataInput)
    assert text_input.inputs == list(text.files) and prepared_input.inputs == [prepared.prepared]
    # The prepared directory's validation windows are those packed from the text it was written from.
    assert prepared_input.validation_windows(prepared, tok, None) == text_input.validation_windows(text, tok, None)
    assert prepared_input.tokenizer(prepared, "")[0].get_vocab() == tok.get_vocab()
    prepared_input.check_tokenizer(tok)  # the tokenizer that wrote it: accepted


def test_only_the_factory_asks_which_kind_of_input_a_plan_is():
    """`plan.prepared` is read in one place, `loader.data_input`: elsewhere the DataInput's methods."""
    readers = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if ".prepared" not in text:
            continue
        tree = ast.parse(text)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and node.attr == "prepared" and isinstance(node.value, ast.Name):
                    if node.value.id == "plan":
                        readers.append(f"{path.relative_to(SRC)}:{fn.name}")
    assert sorted(set(readers)) == ["data/loader.py:data_input"]
