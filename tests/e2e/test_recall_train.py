"""Recall end to end: `pkmlm-eval eval.recall=...` on a short trained run, recall logged at each
evaluation of a training run (on 1 process and on 2), and a bad recall file refused before training
(tests/unit/test_recall.py checks the metrics alone)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import read_rows, run_cli
from helpers import train_in_process as _train_in_process
from test_distributed import _torchrun

from pkmlm.errors import DataError
from pkmlm.metrics.recall import evaluate_recall


@pytest.mark.slow
def test_pkmlm_eval_adds_recall_metrics(tmp_path):
    from pkmlm.knowledge.facts import write_corpus

    write_corpus(tmp_path / "facts", 30, seed=0, templates=2)
    bios = tmp_path / "facts" / "bios.jsonl"
    _train_in_process(tmp_path / "run", f"data.files=[{bios}]", "data.tokenizer_docs=60")
    out = run_cli(
        "pkmlm.cli.eval",
        [
            f"checkpoint={tmp_path / 'run'}",
            f"eval.recall={tmp_path / 'facts' / 'qa.jsonl'}",
            "eval.recall_max_questions=60",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["recall/questions"] == 60 and 0 <= result["recall/exact_match"] <= 1
    assert result["recall/bits"] >= 0 and result["recall/answer_nll"] > 0
    assert result["recall/params/memory_values"] > 0 and "recall/bits_per_param/memory_values" in result
    assert result["recall/bits_per_param/active"] == pytest.approx(
        result["recall/bits"] / result["recall/params/active"]
    )
    # pkmlm-compare shows a run's recall (here pkmlm-eval's output saved as RUN/recall.json).
    (tmp_path / "run" / "recall.json").write_text(out.stdout)
    compare = run_cli("pkmlm.cli.compare", [str(tmp_path / "run"), "--out", str(tmp_path / "cmp")], cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr[-2000:]
    assert "bits stored / available" in compare.stdout and (tmp_path / "cmp" / "recall.md").is_file()
    bad = run_cli(
        "pkmlm.cli.eval", [f"checkpoint={tmp_path / 'run'}", f"eval.recall={tmp_path / 'nope.jsonl'}"], cwd=tmp_path
    )
    assert bad.returncode == 2 and "eval.recall" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_training_logs_recall_at_each_evaluation_without_a_validation_split(tmp_path, capsys):
    """A memory model trained with eval.recall and no validation split (data.val_docs=0, which
    crashed the final evaluation on the missing memory statistics): every evaluation row carries
    the recall metrics, equal to pkmlm-eval's on the final checkpoint, and pkmlm-compare shows them."""
    from pkmlm.cli.compare import main as compare
    from pkmlm.knowledge.facts import write_corpus
    from pkmlm.run import load_run

    write_corpus(tmp_path / "facts", 20, seed=0, templates=2)
    qa = tmp_path / "facts" / "qa.jsonl"
    run = tmp_path / "run"
    summary = _train_in_process(
        run,
        f"data.files=[{tmp_path / 'facts' / 'bios.jsonl'}]",
        "data.tokenizer_docs=40",
        "data.val_docs=0",
        f"eval.recall={qa}",
        "eval.recall_max_questions=30",
        "logging.progress=true",
    )
    evals = [r for r in read_rows(run) if "val/tokens" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["recall/questions"] == 30 and 0 <= r["recall/exact_match"] <= 1 and r["recall/answer_nll"] > 0
        assert 0 <= r["recall/bits"] <= r["recall/bits_available"] and r["recall/params/memory_values"] > 0
        assert r["val/tokens"] == 0 and r["val/loss"] is None and "memory/layer1/usage" not in r  # nothing read
    assert evals[0]["recall/answer_nll"] != evals[1]["recall/answer_nll"]  # measured anew at each evaluation
    assert summary["recall/bits"] == evals[-1]["recall/bits"]
    assert "step 6: no validation batches | recall exact" in capsys.readouterr().err
    # The same numbers as pkmlm-eval's recall on the checkpoint the run ends with.
    final = load_run(run)
    expected = evaluate_recall(final.model, final.tokenizer, qa, max_questions=30)
    assert evals[-1]["recall/answer_nll"] == pytest.approx(expected["recall/answer_nll"], rel=1e-5)
    assert evals[-1]["recall/exact_match"] == expected["recall/exact_match"]
    # The sweep's evaluation of every checkpoint (DCP directories) of the run.
    from pkmlm.knowledge.sweep import evaluate_run

    swept = evaluate_run(run, qa, per_bio=50.0, people=20, templates=2)
    assert [r["step"] for r in swept] == [3, 6] and swept[-1]["recall/questions"] == 120
    assert not (run / "recall.json").exists()  # the sweep's evaluate_cached writes it; compare reads the rows here
    compare([str(run), "--out", str(tmp_path / "cmp")])
    assert "bits stored / available" in capsys.readouterr().out
    last = evals[-1]
    assert (
        f"| {last['recall/bits']:,.0f} / {last['recall/bits_available']:,.0f} |"
        in (tmp_path / "cmp" / "recall.md").read_text()
    )


def test_training_refuses_a_bad_recall_file_before_it_starts(tmp_path):
    for path, needle in ((tmp_path / "missing.jsonl", "No such file"), (tmp_path, "a directory")):
        with pytest.raises(DataError, match=needle):
            _train_in_process(tmp_path / "run", f"eval.recall={path}")
        assert not (tmp_path / "run" / "checkpoints").exists()
    from pkmlm.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.recall_max_questions"):
        _train_in_process(tmp_path / "run", "eval.recall_max_questions=0")


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
def test_recall_in_training_on_two_processes_equals_one(tmp_path):
    """2 processes with the value table sharded over them (every memory read is a collective, so
    recall must run on all ranks in lockstep): the recall at each evaluation equals that of 1
    process seeing the same global batches."""
    from pkmlm.knowledge.facts import write_corpus

    write_corpus(tmp_path / "facts", 20, seed=0, templates=2)
    args = (
        f"data.files=[{tmp_path / 'facts' / 'bios.jsonl'}]",
        "data.tokenizer_docs=40",
        f"eval.recall={tmp_path / 'facts' / 'qa.jsonl'}",
        "eval.recall_max_questions=40",
        "model.memory.query_norm=layernorm",
    )
    _train_in_process(tmp_path / "one", *args, "train.data_shards=2")
    _torchrun(tmp_path / "two", *args, "model.memory.shard_values=true")
    one, two = ([r for r in read_rows(tmp_path / run) if "recall/bits" in r] for run in ("one", "two"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [3, 6]
    for a, b in zip(one, two):
        assert b["recall/answer_nll"] == pytest.approx(a["recall/answer_nll"], rel=1e-4)
        assert b["recall/exact_match"] == a["recall/exact_match"] and b["recall/questions"] == 40
