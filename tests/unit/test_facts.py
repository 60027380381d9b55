"""pkmlm-facts: determinism, cardinalities and bits, name tokenisation, the CLI contract, and
mixing the biographies with web text through data.sources."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
from conftest import C4
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pkmlm.cli.facts import main as facts_main
from pkmlm.config import config_dir, register_configs
from pkmlm.data.mixing import MixedDocuments, resolve_sources
from pkmlm.data.tokenizer import train_bpe
from pkmlm.knowledge.facts import ATTRIBUTES, make_people, write_corpus


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_files_other_seed_other_people(tmp_path):
    write_corpus(tmp_path / "a", 40, seed=3, templates=3)
    write_corpus(tmp_path / "b", 40, seed=3, templates=3)
    write_corpus(tmp_path / "c", 40, seed=4, templates=3)
    for name in ("bios.jsonl", "qa.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "qa.jsonl").read_bytes() != (tmp_path / "c" / "qa.jsonl").read_bytes()


def test_smaller_corpus_is_a_prefix_of_a_larger_one():
    """The sweep shares one tokenizer per seed across N: the first people are the same people."""
    small, attrs_small = make_people(30, seed=1)
    large, attrs_large = make_people(90, seed=1)
    assert large[:30] == small
    assert [a.values for a in attrs_small] == [a.values for a in attrs_large]


def test_cardinalities_bits_and_every_fact_stated(tmp_path):
    n, templates = 60, 4
    meta = write_corpus(tmp_path, n, seed=0, templates=templates)
    bios, qa = _read(tmp_path / "bios.jsonl"), _read(tmp_path / "qa.jsonl")
    people, attributes = make_people(n, seed=0)
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert len(bios) == n * templates and len(qa) == n * len(ATTRIBUTES)
    assert len({p.name for p in people}) == n  # unique names
    cards = {a.name: a.n_values for a in attributes}
    assert meta["cardinalities"] == cards and set(cards) == set(ATTRIBUTES)
    assert all(v >= 32 for v in cards.values())  # several bits each
    assert meta["total_bits"] == pytest.approx(n * sum(math.log2(c) for c in cards.values()))
    values = {a.name: set(a.values) for a in attributes}
    for a in attributes:  # distinct and prefix-free: a greedy answer is never the start of another
        assert len(values[a.name]) == a.n_values
        ordered = sorted(a.values)  # a prefix sorts right before a string that extends it
        assert not any(v.startswith(u) for u, v in itertools.pairwise(ordered))
    facts = {p.name: p.facts for p in people}
    for q in qa:
        assert q["n_values"] == cards[q["attribute"]] and q["answer"] in values[q["attribute"]]
        assert q["answer"] == facts[q["person"]][q["attribute"]] and q["prompt"].startswith(q["person"])
    by_person: dict[str, list[str]] = {}
    for doc in bios:
        by_person.setdefault(doc["person"], []).append(doc["text"])
        for value in facts[doc["person"]].values():  # every fact, stated as the question asks it
            assert f" {value}." in doc["text"]
    assert all(len(docs) == templates for docs in by_person.values())
    # Several templates and orders: a person's biographies are not all the same text.
    assert sum(len(set(docs)) > 1 for docs in by_person.values()) >= 0.9 * n
    # The question is one of the biographies' own phrasings (one of three, so with 4 biographies
    # per person 1 - (2/3)^4 = 80% of the questions appear verbatim in the person's biographies).
    hits = sum(any(f"{q['prompt']} {q['answer']}." in t for t in by_person[q["person"]]) for q in qa)
    assert 0.65 * len(qa) <= hits < len(qa)


def test_names_are_several_tokens(tmp_path):
    write_corpus(tmp_path, 200, seed=0, templates=5)
    texts = [d["text"] for d in _read(tmp_path / "bios.jsonl")]
    tok = train_bpe(texts, 1024)  # the knowledge presets' tokenizer: 1024 BPE on the biographies
    people, _ = make_people(200, seed=0)
    pieces = [len(tok.encode(" " + p.name).ids) for p in people]
    assert min(pieces) >= 2 and sum(pieces) / len(pieces) >= 3


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pkmlm.cli.facts", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_writes_corpus_and_refuses_bad_values_in_one_line(tmp_path, capsys):
    ok = _cli("--people", "12", "--seed", "5", "--out", "facts", "--templates", "2", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["people"] == 12 and summary["documents"] == 24
    assert len(_read(tmp_path / "facts" / "bios.jsonl")) == 24
    (tmp_path / "afile").write_text("x")
    for args, needle in (
        (["--people", "0", "--seed", "1", "--out", "x"], "--people"),
        (["--people", "3", "--seed", "1", "--templates", "0", "--out", "x"], "--templates"),
        (["--people", "3", "--seed", "1", "--out", "afile"], "--out"),
        (["--people", "three", "--seed", "1", "--out", "x"], "--people"),
        (["--seed", "1", "--out", "x"], "--people"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            facts_main([*args[:-1], str(tmp_path / args[-1])] if args[-2] == "--out" else args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and needle in err, (args, err)
        assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not C4.is_file(), reason="needs the C4 sample")
def test_mix_preset_draws_biographies_and_web_text_by_weight(tmp_path):
    write_corpus(tmp_path, 50, seed=0, templates=4)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=knowledge/mix_dense",
                f"data.sources.0.files=[{tmp_path / 'bios.jsonl'}]",
                f"data.sources.1.files=[{C4}]",
                "data.sources.0.weight=3.0",
            ],
        )
    GlobalHydra.instance().clear()
    data = OmegaConf.to_object(cfg).data
    assert [s.name for s in data.sources] == ["bios", "wiki"] and data.files == []
    mix = MixedDocuments(resolve_sources(data), data, seed=0)
    names = {p.name for p in make_people(50, seed=0)[0]}
    draws = [mix.next_document() for _ in range(400)]
    bios = sum(any(n in d[:60] for n in names) for d in draws)
    assert 0.65 < bios / len(draws) < 0.85  # weight 3:1 -> 75% biographies
