"""scripts/engram_name_sharing.py: which rows a name's n-grams read and which are the person's own,
the groups by quantile, the per-person bits (against `evaluate_recall`), the summary, and bad facts
refused in one line, against values worked out by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import VOCAB, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers

from pkmlm.metrics.recall import Question, evaluate_recall
from pkmlm.model.variants.engram import Compression, EngramConfig, EngramLayer, plan_table_sizes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import engram_name_sharing as sharing  # noqa: E402

WORDS = ["<|endoftext|>", "Ann", "Lee", "was", "born", "works", "in", "Oslo", "Rome", "at", "Acme", "Bo", "Cy"]
TEXT = "Ann Lee was born Ann Lee works"  # tokens 1..7 after end-of-text at position 0


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _layer() -> EngramLayer:
    cfg = EngramConfig(layers=[0], heads=2, embed_dim=8, table_size=101)  # orders 2 and 3
    cfg.validate(n_layers=1)
    layer = EngramLayer(8, cfg, 0, len(WORDS), plan_table_sizes(cfg)[0])
    layer.install_compression(Compression(torch.arange(len(WORDS)), len(WORDS), "test"), 0)
    return layer


def test_name_rows_and_the_other_rows_of_a_text():
    tok, layer = _tokenizer(), _layer()
    rows_TR = layer.rows(torch.tensor([[0, *tok.encode(TEXT).ids]]))[0]  # (8, 2 orders x 2 heads)
    order = {2: slice(0, 2), 3: slice(2, 4)}

    def read(pairs):
        return {r for t, n in pairs for r in rows_TR[t, order[n]].tolist()}

    every = [(t, n) for t in range(8) for n in (2, 3)]
    # Name tokens only: the bigram "Ann Lee" at positions 2 and 6; everything else is other.
    only = [(2, 2), (6, 2)]
    named, other = sharing.name_and_other_rows(layer, tok, 0, TEXT, "Ann Lee", neighbours=False)
    assert named == read(only) and other == read([p for p in every if p not in only])
    # With neighbours: every n-gram with a name token; only (0, *) (end-of-text, padding) and
    # (4, 2) ("was born") are other.
    plain = [(0, 2), (0, 3), (4, 2)]
    named, other = sharing.name_and_other_rows(layer, tok, 0, TEXT, "Ann Lee", neighbours=True)
    assert named == read([p for p in every if p not in plain]) and other == read(plain)


def test_own_rows_are_those_nothing_else_reads():
    rows = {"a": {1, 2, 3, 4}, "b": {3, 4, 5}, "c": {4}, "d": set()}
    # a: 1, 2 its own (3 shared with b, 4 with b and c); b: 5 alone; c: none; d: no rows at all.
    assert sharing.own_row_shares(rows) == {"a": 0.5, "b": pytest.approx(1 / 3), "c": 0.0, "d": 1.0}
    # Row 1 also read by an n-gram that is no name's: a keeps only row 2.
    assert sharing.own_row_shares(rows, {1, 9})["a"] == 0.25


def test_groups_split_at_quantiles_ties_going_up():
    edges = [0.2, 0.5, 0.5, 0.9]
    assert [sharing.group_of(x, edges) for x in (0.1, 0.2, 0.49, 0.5, 0.7, 0.9, 0.95)] == [-1, 0, 0, 2, 2, 2, -1]
    assert sharing.group_of(1.0, [0.0, 0.5, 1.0]) == 1  # the top edge is inclusive
    shares = {"a": 0.1, "b": 0.3, "c": 0.3, "d": 0.3, "e": 0.8}  # median 0.3: b, c, d go up
    assert sharing.groups(shares, [0.0, 0.5, 1.0]) == [(0.1, 0.3, ["a"]), (0.3, 0.8, ["b", "c", "d", "e"])]


def test_quantiles_interpolate_between_order_statistics():
    assert sharing.quantile([4.0, 1.0, 3.0, 2.0], 0.0) == 1.0
    assert sharing.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert sharing.quantile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert sharing.quantile([7.0], 0.3) == 7.0


def test_person_bits_sum_to_evaluate_recall_per_person():
    words = ["<|endoftext|>", *[f"w{i}" for i in range(1, 30)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert len(words) <= VOCAB
    model = tiny_model("none")
    questions = [
        Question("w1 w2 w3", "w4", 4, "a", "w1 w2"),
        Question("w1 w2 w5", "w6 w7", 64, "b", "w1 w2"),
        Question("w8 w9 w3", "w10", 8, "a", "w8 w9"),
    ]
    per = sharing.person_bits(SimpleNamespace(model=model, tokenizer=tok), questions)
    for person in ("w1 w2", "w8 w9"):
        mine = [q for q in questions if q.person == person]
        expected = evaluate_recall(model, tok, mine)
        assert per[person][0] == pytest.approx(expected["recall/bits"], rel=1e-6)
        assert per[person][1] == pytest.approx(expected["recall/bits_available"])
    assert per["w1 w2"][1] == pytest.approx(2 + 6)


def test_summary_reads_each_persons_share_and_correlates_over_people():
    bits = {
        "engram": {"a": (1.0, 2.0), "b": (2.0, 2.0), "c": (0.0, 2.0), "x": (1.0, 2.0)},  # 0.5, 1, 0
        "control": {"a": (1.0, 4.0), "b": (4.0, 4.0), "c": (0.0, 4.0)},  # 0.25, 1, 0; x not scored
    }
    out = sharing.summary(bits, {"a": 0.2, "b": 0.2, "c": 0.2, "x": 0.9}, {"a": 5, "b": 7, "c": 3, "x": 1})
    assert out["people"] == 3  # x left out: the control did not score it
    assert out["engram_person_share_median"] == 0.5 and out["control_person_share_median"] == 0.25
    assert out["engram_person_share_p10"] == pytest.approx(0.1)  # 0 + 0.2 x (0.5 - 0)
    assert out["corr_engram_control"] > 0.9
    assert out["corr_engram_own_row_share"] is None  # a constant side has no correlation
    assert out["corr_engram_name_tokens"] == 1.0  # shares 0, 0.5, 1 against tokens 3, 5, 7


@pytest.mark.parametrize("text", ["0,x,1", "0.5", "0,1.5", "0,0.5,0.5,1", "1,0"])
def test_bad_bins_are_refused_with_the_fix(text):
    with pytest.raises(SystemExit, match="--bins"):
        sharing.parse_bins(text)
    assert sharing.parse_bins("0,0.25,1") == [0.0, 0.25, 1.0]


def _facts(tmp_path, bios, questions):
    (tmp_path / "bios.jsonl").write_text("".join(json.dumps(b) + "\n" if isinstance(b, dict) else b for b in bios))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return tmp_path


QA = {"prompt": "Ann Lee was born in", "answer": "Oslo", "n_values": 4, "attribute": "birth_city", "person": "Ann Lee"}


@pytest.mark.parametrize(
    "bios, questions, words",
    [
        (["{not json\n"], [QA], "line 1: not a JSON object"),
        ([{"text": "Ann Lee was born in Oslo."}], [QA], "line 1: not a JSON object with text and person"),
        ([{"text": "Bo was born in Rome.", "person": "Bo"}], [QA], "1 people asked about have no biography"),
        ([{"text": "Ann Lee was born in Oslo.", "person": "Ann Lee"}], [{**QA, "person": ""}], "without its person"),
    ],
)
def test_bad_facts_are_refused_in_one_line(tmp_path, bios, questions, words):
    facts = _facts(tmp_path, bios, questions)
    with pytest.raises(SystemExit, match=words):
        sharing.read_facts(facts)
    with pytest.raises(SystemExit, match="no bios.jsonl"):
        sharing.read_facts(tmp_path / "nowhere")


def test_good_facts_are_read(tmp_path):
    bio = {"text": "Ann Lee was born in Oslo.", "person": "Ann Lee"}
    questions, bios = sharing.read_facts(_facts(tmp_path, [bio, "\n"], [QA]))
    assert bios == [("Ann Lee was born in Oslo.", "Ann Lee")]
    assert [(q.prompt, q.answer, q.person) for q in questions] == [("Ann Lee was born in", "Oslo", "Ann Lee")]
