"""Recall metrics: the bits formula on a model whose answer probabilities are set exactly, the
batched scorer against one-sequence-at-a-time scoring and greedy generation, and
`pkmlm-eval eval.recall=...` end to end on a short trained run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from torch import nn

from pkmlm.errors import DataError
from pkmlm.metrics.continuations import score_continuations
from pkmlm.metrics.recall import Question, evaluate_recall, read_questions, stored_bits
from pkmlm.model.transformer import ModelConfig, Transformer
from pkmlm.run import generate

WORDS = [
    "<|endoftext|>",
    "Ann",
    "Bo",
    "Cy",
    "lives",
    "in",
    "works",
    "at",
    "Paris",
    "Rome",
    "Oslo",
    "New",
    "York",
    "Old",
    "Acme",
    "Globex",
]


def word_tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


class Bigram(nn.Module):
    """A real causal LM whose next-token distribution depends on the current token only:
    log p(next | current) = log_softmax(table[current]). Setting a row sets a distribution exactly."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab, vocab))

    def set_row(self, current: str, probs: dict[str, float]) -> None:
        """p(w | current) = probs[w]; the remaining mass spread evenly over the other words."""
        rest = (1.0 - sum(probs.values())) / (len(WORDS) - len(probs))
        row = torch.full((len(WORDS),), rest)
        for w, p in probs.items():
            row[WORDS.index(w)] = p
        with torch.no_grad():
            self.table[WORDS.index(current)] = row.log()

    def forward(self, idx_BT):
        return self.table[idx_BT]  # (B, T, V) logits


def test_stored_bits_formula():
    assert stored_bits(0.0, 1024) == pytest.approx(10.0)  # certain: all log2 n bits
    assert stored_bits(math.log(8), 8) == pytest.approx(0.0)  # uniform over the values: nothing
    assert stored_bits(math.log(64), 8) == 0.0  # worse than uniform: clamped, not negative
    assert stored_bits(math.log(2), 4) == pytest.approx(1.0)


def test_recall_metrics_on_known_answer_probabilities():
    lm = Bigram(len(WORDS))
    lm.set_row("in", {"Paris": 0.5, "Rome": 0.3})  # Ann lives in -> Paris (argmax)
    lm.set_row("at", {"Acme": 1 / 16, "Globex": 0.5})  # Bo works at -> Acme: below uniform over 8
    lm.set_row("lives", {"in": 0.9})
    lm.set_row("works", {"at": 0.9})
    lm.set_row("Oslo", {"New": 0.5})
    lm.set_row("New", {"York": 0.25, "Old": 0.5})  # ... New York: first token argmax, second not
    questions = [
        Question("Ann lives in", "Paris", 4),
        Question("Bo works at", "Acme", 8),
        Question("Cy lives in Oslo", "New York", 1024),
    ]
    m = evaluate_recall(lm, word_tokenizer(), questions, batch_size=2)
    nll = [math.log(2), math.log(16), -math.log(0.5 * 0.25)]
    assert m["recall/answer_nll"] == pytest.approx(sum(nll) / 3, rel=1e-5)
    # 2 - 1 = 1 bit; 3 - 4 < 0 -> 0; 10 - 3 = 7 bits.
    assert m["recall/bits"] == pytest.approx(8.0, rel=1e-5)
    assert m["recall/bits_available"] == pytest.approx(2 + 3 + 10)
    assert m["recall/exact_match"] == pytest.approx(1 / 3)
    n = len(WORDS) ** 2
    assert m["recall/bits_per_param/total"] == pytest.approx(8.0 / n, rel=1e-5)
    assert m["recall/params/total"] == n and "recall/bits_per_param/memory_values" not in m


def _model(memory: bool) -> Transformer:
    torch.manual_seed(0)
    mem = {"layers": [1], "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16} if memory else {"layers": []}
    from pkmlm.model.memory import MemoryConfig

    return Transformer(
        ModelConfig(vocab_size=48, n_layers=2, dim=32, n_heads=2, max_seq_len=12, memory=MemoryConfig(**mem))
    ).eval()


@pytest.mark.parametrize("memory", [False, True])
def test_batched_scores_equal_one_at_a_time_and_greedy_equals_generation(memory):
    model = _model(memory)
    g = torch.Generator().manual_seed(1)
    requests = []
    for n_ctx, n_cont in ((1, 1), (3, 2), (9, 3), (14, 4), (5, 1)):  # (14, 4): cut to the window
        requests.append(
            (
                torch.randint(0, 48, (n_ctx,), generator=g).tolist(),
                torch.randint(0, 48, (n_cont,), generator=g).tolist(),
            )
        )
    # One request made greedy on purpose: its continuation is what generation gives.
    ctx = requests[1][0]
    requests.append((ctx, generate(model, ctx, max_new_tokens=3, temperature=0)))
    scores = score_continuations(model, requests, max_len=12, batch_size=4)
    for (ctx, cont), score in zip(requests, scores):
        whole = (ctx + cont)[-13:]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0][0], -1)
        positions = range(len(whole) - 1 - len(cont), len(whole) - 1)
        expected = sum(float(logp[t, whole[t + 1]]) for t in positions)
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        greedy = all(int(logp[t].argmax()) == whole[t + 1] for t in positions)
        assert score.greedy == greedy
        if len(ctx) + len(cont) <= 12:  # generation sees the same window
            assert greedy == (generate(model, ctx, max_new_tokens=len(cont), temperature=0) == cont)
    assert scores[-1].greedy
    with pytest.raises(ValueError, match="does not fit"):
        score_continuations(model, [([1], list(range(13)))], max_len=12)


def test_bad_qa_files_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="No such file"):
        read_questions(tmp_path / "missing.jsonl")
    path = tmp_path / "qa.jsonl"
    for line, needle in (
        ('{"prompt": "a"', "not a JSON object"),
        ('{"prompt": "a", "answer": ""}', "'answer'"),
        ('{"prompt": "a", "answer": "b", "n_values": 0}', "n_values"),
    ):
        path.write_text(json.dumps({"prompt": "p", "answer": "x", "n_values": 2}) + "\n" + line + "\n")
        with pytest.raises(DataError, match=needle) as info:
            read_questions(path)
        assert "line 2" in str(info.value)


def test_knowledge_report_table_and_plot(tmp_path):
    from pkmlm.experiments.report import knowledge_plot, recall_markdown
    from pkmlm.experiments.runs import RunSummary

    def run(name, people, bits, total):
        row = {
            "step": 10,
            "recall/people": people,
            "recall/bits": bits,
            "recall/bits_available": 50.0 * people,
            "recall/exact_match": 0.5,
            "recall/params/total": total,
            "recall/bits_per_param/total": bits / total,
        }
        return RunSummary(path=tmp_path, label=f"{name} N={people}", config={}, rows=[row], name=name)

    runs = [
        run("knowledge/dense", 100, 4000.0, 1000),
        run("knowledge/dense", 200, 6000.0, 1000),
        run("knowledge/mem", 100, 4500.0, 2000),
        RunSummary(path=tmp_path, label="no recall", config={}, rows=[]),
    ]
    table = recall_markdown(runs)
    assert "knowledge/mem N=100" in table and "no recall" not in table and "6,000 / 10,000" in table
    people, params = tmp_path / "bits.png", tmp_path / "params.png"
    assert knowledge_plot(runs, people, params) == [people, params]
    assert people.stat().st_size > 0 and params.stat().st_size > 0
    assert knowledge_plot(runs, tmp_path / "only.png") == [tmp_path / "only.png"]
    assert not knowledge_plot(runs[3:], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_bits_vs_parameters_axes_are_readable_and_show_both_arms(tmp_path, monkeypatch):
    """The parameters figure: one point per run and arm, active and memory-value counts as a second
    series, SI tick labels that do not overlap (counts close together: linear; a wide span: log)."""
    import matplotlib.pyplot as plt

    from pkmlm.experiments.report import knowledge_plot
    from pkmlm.experiments.runs import RunSummary

    def run(name, people, bits, total, active, values):
        row = {"step": 10, "recall/people": people, "recall/bits": bits, "recall/bits_available": 50.0 * people}
        row.update({"recall/params/total": total, "recall/params/active": active})
        row["recall/params/memory_values"] = values
        return RunSummary(path=tmp_path, label=f"{name} N={people}", config={}, rows=[row], name=name)

    runs = [
        run("knowledge/dense", 100, 4000.0, 1_210_000, 1_210_000, 0),
        run("knowledge/dense", 200, 6000.0, 1_210_000, 1_210_000, 0),
        run("knowledge/mem", 100, 4500.0, 1_290_000, 1_150_000, 65_536),
        run("knowledge/mem", 200, 7000.0, 1_290_000, 1_150_000, 65_536),
    ]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert len(knowledge_plot(runs, tmp_path / "people.png", tmp_path / "params.png")) == 2
    ax_total, ax_active = figures[-1].axes
    assert len(ax_total.collections) == 2  # one scatter per arm
    assert [len(c.get_offsets()) for c in ax_total.collections] == [2, 2]
    assert len(ax_active.collections) == 3  # dense active, mem active, mem memory values
    assert ax_total.get_xscale() == "linear" and ax_active.get_xscale() == "log"
    figures[-1].canvas.draw()
    for ax in (ax_total, ax_active):
        boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert boxes and len(set(labels)) == len(labels) and all(t[-1] in "0123456789kM" for t in labels)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert not ax_total.xaxis.get_offset_text().get_text()


def test_sweep_table_picks_equal_exposures_and_equal_time(tmp_path):
    from pkmlm.knowledge.sweep import main
    from pkmlm.knowledge.sweep_report import summary_table

    def row(arm, step, time_s, bits, people=10):
        return {
            "arm": arm,
            "people": people,
            "seed": 0,
            "steps_equal": 8,
            "step": step,
            "exposures": step * 2.0,
            "run_dir": str(tmp_path / f"{arm}-N{people}"),
            "recall/people": people,
            "train_time_s": time_s,
            "recall/bits": bits,
            "recall/bits_available": 500.0,
            "recall/exact_match": bits / 500,
            "recall/bits_per_param/total": bits / 1000,
            "recall/params/total": 1000,
            "recall/params/embedding": 200,
        }

    rows = [
        row("dense", 4, 10.0, 100.0),
        row("dense", 8, 20.0, 200.0),
        row("dense", 12, 30.0, 300.0),
        row("mem", 4, 14.0, 120.0),
        row("mem", 8, 28.0, 220.0),
    ]
    lines = summary_table(rows).splitlines()[2:]
    assert len(lines) == 3
    assert "dense (equal exposures)" in lines[0] and "| 200 |" in lines[0] and "0.2500" in lines[0]
    assert "dense (equal time to mem)" in lines[1] and "| 300 |" in lines[1]  # 30 s: nearest the memory's 28 s
    assert "mem (equal exposures)" in lines[2] and "| 220 |" in lines[2]
    # --merge: two earlier sweeps' results.jsonl in one table and figures (bits vs exposures, vs N).
    for name, part in (("a", rows), ("b", [row("dense", 8, 20.0, 350.0, people=20), row("mem", 8, 28.0, 300.0, 20)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| 10 (seed 0) |" in table and "| 20 (seed 0) |" in table and "| 350 |" in table
    # N=20's dense run stopped at 20 s, before the memory's 28 s: no equal-time row for it.
    assert table.split("Per seed:")[1].split("Where the bits go")[0].count("dense (equal time to mem)") == 1
    figures = ("bits_vs_exposures.png", "bits_vs_people.png", "bits_vs_parameters.png")
    assert all((tmp_path / "out" / f).stat().st_size > 0 for f in figures)
