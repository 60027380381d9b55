"""Bad input: every file, config and CLI value that once hung, crashed with a traceback or slipped
through (issue 13) now gets one line on stderr and exit status 2 within seconds, with nothing
written outside the run directory, or a documented bounded behaviour (long records and documents).

Each test reproduces the original failure through the real entry point: `main()` of the CLI
in-process (its checks run before Hydra, so nothing else is needed), or the CLI in a subprocess
where Hydra itself must run. docs/reliability.md, "Bad input", lists the promise each one holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import C4
from helpers import overrides, run_cli

from pkmlm.data.config import DataConfig
from pkmlm.data.loader import TokenBatches, load_or_train_tokenizer, resolve_data, stats_row
from pkmlm.data.sources import DocumentStream
from pkmlm.data.tokenizer import encode_documents, split_document, train_bpe
from pkmlm.errors import DataError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _run_time(monkeypatch):
    # The precheck pins PKMLM_RUN_TIME for Hydra's run directory; keep it out of later tests.
    monkeypatch.setenv("PKMLM_RUN_TIME", "2020-01-01T00:00:00")


def refused(capsys, monkeypatch, cwd, module: str, args: list[str], needle: str) -> str:
    """Run the CLI's `main()` with `args`; it must exit 2 with one line naming `needle`, quickly,
    and write nothing in `cwd`."""
    import importlib

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [module, *args])
    before = sorted(os.listdir(cwd))
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert time.monotonic() - start < 60
    assert sorted(os.listdir(cwd)) == before  # no outputs/, multirun/ or anything else
    return lines[0]


def train_refused(capsys, monkeypatch, tmp_path, needle: str, *extra: str) -> str:
    return refused(
        capsys,
        monkeypatch,
        tmp_path,
        "pkmlm.cli.train",
        [*overrides(*extra), f"hydra.run.dir={tmp_path / 'run'}"],
        needle,
    )


# --- files ------------------------------------------------------------------------------------------


def test_fifo_data_file_is_refused_without_opening_it(tmp_path, capsys, monkeypatch):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    work = tmp_path / "work"
    work.mkdir()
    line = train_refused(capsys, monkeypatch, work, "FIFO", f"data.files=[{fifo}]")  # used to hang for ever
    assert str(fifo) in line


def test_device_data_file_is_refused(tmp_path, capsys, monkeypatch):
    train_refused(capsys, monkeypatch, tmp_path, "character device", "data.files=[/dev/zero]")  # was: all RAM


@pytest.mark.parametrize(
    "name, content",
    [
        ("one_line.jsonl", b'{"text": "' + b"a" * 3_000_000 + b'"}\n{"text": "after"}\n'),
        ("no_newline.txt", b"x" * 3_000_000 + b"\n\nafter\n"),
        ("array.json", b'[{"text": "' + b"a" * 3_000_000 + b'"}]'),
    ],
)
def test_records_over_the_limit_are_skipped_and_counted(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    stream = DocumentStream([str(path)], max_record_bytes=1 << 20)
    texts = list(stream)
    assert stream.stats == {"too_long": 1}
    assert texts == ([] if name == "array.json" else ["after"])
    with pytest.raises(DataError, match=r"longer than data\.max_record_bytes"):
        list(DocumentStream([str(path)], strict=True, max_record_bytes=1 << 20))


def test_long_documents_reach_the_tokenizer_in_bounded_pieces(tmp_path):
    words = "memory key value product layer the of and north river city".split()
    doc = " ".join(words[(i * 7) % len(words)] for i in range(200_000))  # ~1.1 MB, one document
    tok = train_bpe([doc[:50_000]], vocab_size=300)
    pieces = split_document(doc, 20_000)
    assert len(pieces) > 50 and max(map(len, pieces)) <= 20_000 and "".join(pieces) == doc
    # Cut before whitespace: the pieces' ids are exactly the whole document's.
    assert encode_documents(tok, [doc, "short"], max_chars=20_000) == [
        tok.encode(doc, add_special_tokens=False).ids,
        tok.encode("short", add_special_tokens=False).ids,
    ]
    # Through the pipeline: counted as split, every token kept.
    files = [str(tmp_path / "long.jsonl")]
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": doc}) + "\n" + json.dumps({"text": "tail"}) + "\n")
    cfg = DataConfig(files=files, val_docs=0, seq_len=64, shuffle_buffer=0, max_doc_chars=20_000)
    batches = TokenBatches(cfg, resolve_data(cfg), tok, batch_size=4, seed=0)
    next(batches)
    assert stats_row(batches.stats)["data/split_docs"] == 1


def test_given_tokenizer_without_the_special_tokens_is_refused(tmp_path, capsys, monkeypatch):
    tok = train_bpe(["some text to learn from"] * 20, vocab_size=300)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    work = tmp_path / "work"
    work.mkdir()
    train_refused(
        capsys,
        monkeypatch,
        work,
        "lacks data.special_tokens ['<|pad|>']",
        f"data.tokenizer={path}",
        "data.special_tokens=['<|pad|>']",
    )  # was: silently ignored


# --- config values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.shuffle_buffer=1000000000", "data.shuffle_buffer"),  # was: no batch after 150 s, SIGTERM ignored
        ("train.max_steps=1e23", "train.max_steps"),  # was: accepted
        ("train.max_steps=100000000000", "train.max_steps"),
        ("+train.max_step=1", "did you mean train.max_steps?"),  # was: accepted, the full schedule run
        ("train.max_step=1", "did you mean train.max_steps?"),  # a misspelt key: Hydra's error, the nearest key
        ("name=../escaped", "name="),  # was: a run outside outputs/
        ("model.memory.n_keys=100000", "available"),  # was: an allocator traceback
    ],
)
def test_config_values_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, override, needle):
    line = train_refused(capsys, monkeypatch, tmp_path, needle, override)
    if "n_keys" in override:
        assert "GB" in line and "model.memory.n_keys" in line  # the estimate and the device's capacity


def test_sparse_values_on_several_processes_is_refused(tmp_path, capsys, monkeypatch):
    # Was: DDP failed at the first step ("Cannot access storage of SparseTensorImpl").
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = train_refused(capsys, monkeypatch, tmp_path, "optim.sparse_values", "optim.sparse_values=true")
    assert "2 processes" in line


def test_paths_under_a_file_are_refused(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    work = tmp_path / "work"
    work.mkdir()
    train_refused(capsys, monkeypatch, work, "paths.cache_dir", f"paths.cache_dir={a_file}/cache")
    refused(
        capsys,
        monkeypatch,
        work,
        "pkmlm.cli.train",
        ["-m", *overrides("train.max_steps=2,3"), f"hydra.sweep.dir={a_file}/sweep"],
        "hydra.sweep.dir",
    )
    refused(
        capsys, monkeypatch, work, "pkmlm.cli.train", [*overrides(), f"hydra.run.dir={a_file}/run"], "hydra.run.dir"
    )
    refused(capsys, monkeypatch, work, "pkmlm.cli.compare", [str(work), "--out", f"{a_file}/x"], "--out")


def test_multirun_jobs_are_checked_like_single_runs(tmp_path, capsys, monkeypatch):
    line = refused(
        capsys,
        monkeypatch,
        tmp_path,
        "pkmlm.cli.train",
        ["-m", *overrides("train.max_steps=3,0")],
        "sweep job 1 (train.max_steps=0)",
    )
    assert "train.max_steps" in line  # was: exit 1 with Hydra's multi-line message


@pytest.mark.parametrize(
    "module, args, needle",
    [
        # Hydra apps (pkmlm-train has no mandatory value: every key has a default).
        ("pkmlm.cli.eval", [], "checkpoint is required: give checkpoint=DIR"),  # was: MissingMandatoryValue traceback
        ("pkmlm.cli.prepare", [], "out is required: give out="),
        # argparse CLIs: was argparse's usage block then `PROG: error: ...` (inspect: 9 lines).
        ("pkmlm.cli.compare", [], "required: DIR; usage: pkmlm-compare DIR"),
        ("pkmlm.cli.facts", [], "required: --people, --seed, --out; usage: pkmlm-facts"),
        ("pkmlm.cli.facts", ["--people", "3", "--seed", "0"], "required: --out; usage: pkmlm-facts"),
        ("pkmlm.cli.harness", [], "required: RUN, --tasks; usage: pkmlm-harness"),
        ("pkmlm.cli.harness", ["run"], "required: --tasks; usage: pkmlm-harness"),
        ("pkmlm.cli.inspect", [], "required: RUN, --out; usage: pkmlm-inspect"),
        ("pkmlm.cli.inspect", ["run"], "required: --out; usage: pkmlm-inspect"),
        ("pkmlm.cli.inspect", ["run", "--out", "o", "--top", "many"], "--top: invalid int value: 'many'"),
        ("pkmlm.cli.export", [], "required: RUN, --out; usage: pkmlm-export RUN --out DIR"),
        ("pkmlm.cli.export", ["run"], "required: --out; usage: pkmlm-export"),
    ],
)
def test_missing_mandatory_values(tmp_path, capsys, monkeypatch, module, args, needle):
    line = refused(capsys, monkeypatch, tmp_path, module, args, needle)
    assert line.startswith("error: "), line  # the contract's one line (pkmlm.cli._common.fail)
    assert "Traceback" not in line


# --- Hydra's writes only after the checks; a refused run leaves its directory as it was -----------------


def test_refused_run_keeps_the_sweep_jobs_overrides(tmp_path):
    from filelock import FileLock

    job = tmp_path / "multirun" / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    original = yaml.safe_dump(["model.memory.layers=[1]"]).encode()
    (job / ".hydra" / "overrides.yaml").write_bytes(original)
    # Refused by the precheck: Hydra never runs.
    proc = run_cli("pkmlm.cli.train", [*overrides("train.max_steps=0"), f"hydra.run.dir={job}"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in job.rglob("*")) == [".hydra", "overrides.yaml"]
    # Refused by the task after Hydra wrote .hydra/ (here: another process holds the run's lock).
    with FileLock(str(job / ".lock")):
        proc = run_cli("pkmlm.cli.train", [*overrides("train.max_steps=4"), f"hydra.run.dir={job}"], cwd=tmp_path)
    assert proc.returncode == 2 and "in use by another process" in proc.stderr, proc.stderr[-2000:]
    assert (job / ".hydra" / "overrides.yaml").read_bytes() == original
    assert not (job / ".hydra" / "config.yaml").exists() and not list(job.glob("*.log"))
    assert not (tmp_path / "outputs").exists()


def test_a_relaunched_sweep_with_a_locked_job_keeps_its_multirun_yaml(tmp_path):
    from filelock import FileLock

    sweep = tmp_path / "multirun" / "sweep"
    (sweep / "1").mkdir(parents=True)
    original = b"# the sweep's record from its first launch\n"
    (sweep / "multirun.yaml").write_bytes(original)
    with FileLock(str(sweep / "1" / ".lock")):  # job 1 is still training in another process
        proc = run_cli(
            "pkmlm.cli.train",
            ["-m", *overrides("train.max_steps=4"), f"hydra.sweep.dir={sweep}", "seed=1,2"],
            cwd=tmp_path,
        )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "in use by another process" in lines[0], proc.stderr[-2000:]
    assert "seed=2" in lines[0] and str(sweep / "1") in lines[0]  # names the job and its directory
    assert (sweep / "multirun.yaml").read_bytes() == original  # refused before Hydra's sweeper wrote
    assert sorted(p.name for p in sweep.rglob("*")) == [".lock", "1", "multirun.yaml"]  # no job started


def test_a_relaunched_sweep_refused_for_a_resume_conflict_keeps_its_multirun_yaml(
    tmp_path, capsys, monkeypatch, tiny_run
):
    """The resume check made by the command line before Hydra runs (`rundir.check_resume_early`;
    the task makes it again under the lock): a job whose directory holds a checkpoint, or a
    config.yaml, of another config is refused before Hydra's sweeper rewrites multirun.yaml; a job
    whose checkpoint has its own config passes (job 0 of the first launch: it would resume)."""
    import shutil

    from conftest import TINY_RUN_STEPS

    sweep = tmp_path / "multirun" / "sweep"
    shutil.copytree(tiny_run, sweep / "0")  # trained with seed 1337 (the default)
    (sweep / "1").mkdir()
    shutil.copy(tiny_run / "config.yaml", sweep / "1" / "config.yaml")  # a run killed before its first checkpoint
    original = b"# the sweep's record from its first launch\n"
    (sweep / "multirun.yaml").write_bytes(original)
    before = sorted(str(p) for p in sweep.rglob("*"))
    for seeds, needle in [
        ("seed=1337,1", "sweep job 1 (seed=1): run directory"),  # job 0 matches its checkpoint
        ("seed=1,1337", "sweep job 0 (seed=1): cannot resume from"),
    ]:
        args = ["-m", *overrides(*TINY_RUN_STEPS), f"hydra.sweep.dir={sweep}", seeds]
        line = refused(capsys, monkeypatch, tmp_path, "pkmlm.cli.train", args, needle)
        assert "made with another config (seed: 1337 -> 1)" in line, line
        assert (sweep / "multirun.yaml").read_bytes() == original  # refused before Hydra's sweeper wrote
        assert sorted(str(p) for p in sweep.rglob("*")) == before  # no job started


def test_a_user_set_hydra_output_subdir_is_refused(tmp_path, capsys, monkeypatch):
    """Hydra would write `.hydra/` there before the task accepts the run; pkmlm-train writes it itself."""
    train_refused(capsys, monkeypatch, tmp_path, "hydra.output_subdir='.hydra'", "hydra.output_subdir=.hydra")


def test_stop_signal_while_the_shuffle_buffer_fills(tmp_path):
    run_dir = tmp_path / "run"
    args = [*overrides("data.shuffle_buffer=1000000", "data.seq_len=32"), f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pkmlm.cli.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not (run_dir / "config.yaml").exists():  # written by the set-up, before the first batch
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 20  # was: ignored (SIGKILL needed)
    assert proc.returncode == 2 and "SIGTERM received while the first batch was being read" in err, err[-2000:]
    assert "Traceback" not in err


# --- pkmlm-compare on damaged run directories -----------------------------------------------------------


def _fake_run(run_dir, config, metrics: bytes):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.jsonl").write_bytes(metrics)


def _row(**kw) -> bytes:
    return (json.dumps(kw) + "\n").encode()


def test_compare_config_that_is_a_list(tmp_path, capsys, monkeypatch):
    _fake_run(tmp_path / "runs" / "a", ["not", "a", "mapping"], _row(step=1, tokens=10))
    refused(
        capsys,
        monkeypatch,
        tmp_path,
        "pkmlm.cli.compare",
        [str(tmp_path / "runs"), "--out", str(tmp_path / "runs" / "out")],
        "not a mapping",
    )


def test_compare_warns_once_per_damaged_metrics_file(tmp_path, capsys, monkeypatch):
    from pkmlm.cli.compare import main

    good = {"name": "good", "model": {"n_layers": 2, "dim": 64, "memory": {"layers": "oops"}}}
    _fake_run(
        tmp_path / "runs" / "good",
        good,
        _row(step=1, tokens="many", wall_time_s=[1])
        + _row(step=2, tokens=64, **{"val/ppl": "low", "stopped_by": 3})
        + _row(step=3, tokens=96, **{"val/ppl": 12.5}),
    )
    _fake_run(tmp_path / "runs" / "binary", {"name": "binary"}, bytes(range(256)) * 40)
    monkeypatch.chdir(tmp_path)
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert any("binary/metrics.jsonl" in w and "left out" in w for w in warnings), captured.err
    assert any("good/metrics.jsonl" in w and "wrong type" in w for w in warnings), captured.err
    assert "Traceback" not in captured.err
    rows = [line for line in captured.out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 1 and rows[0].startswith("| **good**") and "12.50" in rows[0], captured.out
    # Only damaged runs: nothing to compare, one line.
    refused(
        capsys,
        monkeypatch,
        tmp_path,
        "pkmlm.cli.compare",
        [str(tmp_path / "runs" / "binary"), "--out", str(tmp_path / "out2")],
        "has a readable metrics row",
    )


def test_tokenizer_special_tokens_checked_by_the_data_layer_too(tmp_path):
    tok = train_bpe(["some text to learn from"] * 20, vocab_size=300)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    cfg = DataConfig(files=[str(C4)], tokenizer=str(path), special_tokens=["<|sep|>"])
    with pytest.raises(DataError, match=r"lacks data\.special_tokens \['<\|sep\|>'\]"):
        load_or_train_tokenizer(cfg, resolve_data(cfg), str(tmp_path / "cache"))


def test_a_run_that_trained_keeps_its_hydra_files_when_it_stops_with_a_user_error(tmp_path):
    # The restore is for refusals only: a run that logged rows and then met a bad record
    # (data.strict=true) is a run, and .hydra/ describes it.
    from data_fixtures import make_docs, write_texts_jsonl

    corpus = write_texts_jsonl(tmp_path / "c.jsonl", make_docs(40))
    with open(corpus, "a") as f:
        f.write("{not json\n")
    run_dir = tmp_path / "run"
    proc = run_cli(
        "pkmlm.cli.train",
        [
            *overrides(
                f"data.files=[{corpus}]",
                "data.strict=true",
                "train.max_steps=100",
                "eval.interval=1000",
                "checkpoint.interval=1000",
                "data.tokenizer_docs=20",
                "data.encode_batch_docs=4",
            ),
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "is not a JSON object" in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / "metrics.jsonl").stat().st_size > 0
    assert "data.strict=true" in (run_dir / ".hydra" / "overrides.yaml").read_text()
