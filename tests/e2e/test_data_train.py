"""pkmlm-train from every source type (in process), skipped-record counters in the rows, strict
mode and bad globs from the command line, and loop resume with DataLoader workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import make_docs, write_parquet, write_texts_jsonl, write_wet
from helpers import overrides, read_rows, run_cli, train_in_process
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pkmlm.config import config_dir, register_configs
from pkmlm.errors import ConfigError, DataError

register_configs()

STEPS = [
    "train.max_steps=2",
    "eval.interval=2",
    "checkpoint.interval=2",
    "data.vocab_size=300",
    "data.tokenizer_docs=30",
    "data.val_docs=2",
]


def _train(run_dir: Path, *extra: str) -> dict:
    return train_in_process(run_dir, *STEPS, *extra)


def _corpus(tmp_path: Path, kind: str) -> list[str]:
    docs = make_docs(60)
    if kind == "txt":
        (tmp_path / "c.txt").write_text("\n\n".join(docs))
        return ["data.files=[" + str(tmp_path / "c.txt") + "]"]
    if kind == "jsonl.gz":
        return ["data.files=[" + write_texts_jsonl(tmp_path / "c.jsonl.gz", docs, compress=True) + "]"]
    if kind == "parquet":
        return ["data.files=[" + write_parquet(tmp_path / "c.parquet", docs, row_group_size=16) + "]"]
    if kind == "wet":
        path = write_wet(tmp_path / "CC-MAIN-x.warc.wet.gz", [(f"http://s{i}.example/", d) for i, d in enumerate(docs)])
        return ["data.files=[" + path + "]"]
    if kind == "mix":
        a = write_texts_jsonl(tmp_path / "a.jsonl", docs[:30])
        b = write_wet(tmp_path / "b.warc.wet.gz", [(f"http://b{i}/", d) for i, d in enumerate(docs[30:])])
        return ["data.files=[]", f"data.sources=[{{name: a, files: [{a}], weight: 2}}, {{name: b, files: [{b}]}}]"]
    if kind == "hub":  # a local directory through the same load_dataset(name, config, split, streaming) call
        repo = tmp_path / "repo"
        repo.mkdir()
        write_texts_jsonl(repo / "train.jsonl", docs)
        return ["data.files=[]", f"data.sources=[{{hub: '{repo}', split: train}}]"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["txt", "jsonl.gz", "parquet", "wet", "mix", "hub"])
def test_trains_from_each_source_type(tmp_path, kind):
    summary = _train(tmp_path / "run", *_corpus(tmp_path, kind))
    assert summary["step"] == 2 and summary["val/ppl"] > 1
    rows = read_rows(tmp_path / "run")
    train_rows = [r for r in rows if "train/loss" in r]
    assert train_rows and all(r["data/skipped/malformed_json"] == 0 for r in train_rows)


def test_skipped_records_reach_the_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": d}) for d in make_docs(40)]
    bad.write_text("\n".join(good[:20] + ['{"text": broken', '{"text": 3}'] + good[20:]) + "\n")
    _train(tmp_path / "run", f"data.files=[{bad}]", "train.max_steps=8", "eval.interval=8")
    last = [r for r in read_rows(tmp_path / "run") if "train/loss" in r][-1]
    assert last["data/skipped/malformed_json"] == 1 and last["data/skipped/non_string"] == 1


def test_cli_strict_names_file_and_line_and_bad_glob_fails_first(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"text": d}) for d in make_docs(10)] + ['{"text": oops']) + "\n")
    args = overrides(*STEPS, f"data.files=[{bad}]", "data.strict=true", f"hydra.run.dir={tmp_path / 'run'}")
    result = run_cli("pkmlm.cli.train", args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "bad.jsonl, line 11: the record is not a JSON object" in result.stderr

    glob_args = overrides(
        *STEPS,
        "data.files=[]",
        f"data.sources=[{{files: ['{tmp_path}/none/*.jsonl']}}]",
        f"hydra.run.dir={tmp_path / 'run2'}",
    )
    result = run_cli("pkmlm.cli.train", glob_args, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "data.sources[0].files pattern" in result.stderr and "matches no file" in result.stderr
    assert not (tmp_path / "run2" / "tokenizer.json").exists()  # failed before any work


def test_loop_resume_with_two_workers_is_bitwise(tmp_path):
    corpus = _corpus(tmp_path, "jsonl.gz")
    extra = [*corpus, "data.num_workers=2", "train.max_steps=5", "eval.interval=5", "checkpoint.interval=100"]
    _train(tmp_path / "straight", *extra)
    _train(tmp_path / "split", *extra, "train.stop_at_step=3")  # odd: worker 1's batch is next
    _train(tmp_path / "split", *extra)
    straight = {r["step"]: r["train/loss"] for r in read_rows(tmp_path / "straight") if "train/loss" in r}
    split = {r["step"]: r["train/loss"] for r in read_rows(tmp_path / "split") if "train/loss" in r}
    assert list(straight) == [1, 2, 3, 4, 5] and straight == split


# ------------------------------------------------------------------------------------------------
# pkmlm-eval reads every source type training reads (and prepared shards)


def _eval_cfg(*extra: str):
    from pkmlm.cli.eval import EvalAppConfig  # noqa: F401  (registers eval_config)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(extra))
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """A 2-step run, and pkmlm-eval's result on its training corpus (60 documents) as a JSON lines file."""
    from pkmlm.cli.eval import evaluate_run

    tmp = tmp_path_factory.mktemp("evalrun")
    corpus = _corpus(tmp, "jsonl.gz")
    _train(tmp / "run", *corpus)
    reference = evaluate_run(_eval_cfg(f"checkpoint={tmp / 'run'}", *corpus))
    assert reference["tokens"] > 0
    return tmp / "run", reference


@pytest.mark.parametrize("kind", ["txt", "parquet", "wet", "mix", "hub"])
def test_eval_reads_each_source_type(eval_run, tmp_path, kind):
    from pkmlm.cli.eval import evaluate_run

    run_dir, reference = eval_run
    # The same 60 documents in another format (or split over a mixture's sources, read in order):
    # the same token stream, so exactly the same loss.
    out = evaluate_run(_eval_cfg(f"checkpoint={run_dir}", *_corpus(tmp_path, kind)))
    assert out["tokens"] == reference["tokens"]
    assert out["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert out["memory/layer1/usage"] == pytest.approx(reference["memory/layer1/usage"])


def test_eval_reads_prepared_shards_of_the_runs_tokenizer_only(eval_run, tmp_path):
    from pkmlm.cli.eval import evaluate_run
    from pkmlm.data.config import DataConfig
    from pkmlm.data.mixing import resolve_sources
    from pkmlm.data.prepared import prepare
    from pkmlm.data.tokenizer import load_tokenizer, train_bpe

    run_dir, reference = eval_run
    # The corpus's 60 documents as the validation split (prepare needs a training split too: 5 more).
    files = [write_texts_jsonl(tmp_path / "c.jsonl", make_docs(60) + make_docs(5, seed=9, prefix="train"))]
    cfg = DataConfig(files=files, val_docs=60)
    prepare(cfg, resolve_sources(cfg), load_tokenizer(str(run_dir / "tokenizer.json")), str(tmp_path / "prep"))
    out = evaluate_run(_eval_cfg(f"checkpoint={run_dir}", f"data.prepared={tmp_path / 'prep'}"))
    assert out["tokens"] == reference["tokens"] and out["loss"] == pytest.approx(reference["loss"], rel=1e-6)

    other = train_bpe(make_docs(50, seed=7), vocab_size=280)
    prepare(cfg, resolve_sources(cfg), other, str(tmp_path / "other"))
    with pytest.raises(DataError, match=r"data\.prepared=.*other.* another tokenizer than the run's"):
        evaluate_run(_eval_cfg(f"checkpoint={run_dir}", f"data.prepared={tmp_path / 'other'}"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("batch_size=0", "batch_size"),
        ("max_batches=0", "max_batches"),
        ("device=tpu", "device"),
        ("precision=fp16", "precision"),
        ("data.seq_len=0", "data.seq_len"),
        ("data.seq_len=4096", "data.seq_len"),
    ],
)
def test_eval_values_are_range_checked(eval_run, tmp_path, override, key):
    from pkmlm.cli.eval import evaluate_run

    run_dir, _ = eval_run
    with pytest.raises(ConfigError) as err:
        evaluate_run(_eval_cfg(f"checkpoint={run_dir}", override))
    assert err.value.key == key and "\n" not in str(err.value)


def test_eval_cli_bad_value_is_one_line_exit_2(eval_run, tmp_path):
    run_dir, _ = eval_run
    result = run_cli("pkmlm.cli.eval", [f"checkpoint={run_dir}", "batch_size=0"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: config error: batch_size=0 is invalid: an integer >= 1 (validation windows per batch)"
    ]
