"""Files inside a run, checkpoint or export that someone edited or damaged (issue 25): nothing
unverified is deleted, every file kind is schema-checked on every load path before anything heavy
(one line, exit 2, no traceback), pkmlm-export never overwrites, and output locations and recall
files are checked before the first step. One tiny run (2 checkpoints) is trained once and copied."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_RUN_STEPS
from helpers import read_rows, run_cli, train_in_process

from pkmlm.checkpoint import store
from pkmlm.checkpoint.files import write_manifest
from pkmlm.config import register_configs
from pkmlm.errors import UserError
from pkmlm.run import load_run

register_configs()

STEPS = TINY_RUN_STEPS


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run  # trained with STEPS (conftest.TINY_RUN_STEPS), once for the session


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# --- 1. never delete what was not verified ------------------------------------------------------


def test_deleted_checksums_of_every_checkpoint_refuse_and_keep_them(run, tmp_path):
    """The issue's data loss: with every manifest deleted, resume=auto used to start over and prune
    both checkpoints at its first save. Now: one line, nothing deleted or overwritten, no step run."""
    run_dir = _copy(run, tmp_path)
    for ckpt in store.list_checkpoints(run_dir / "checkpoints"):
        (ckpt / "checksums.sha256").unlink()
    before, rows = _snapshot(run_dir / "checkpoints"), len(read_rows(run_dir))
    with pytest.warns(UserWarning), pytest.raises(UserError) as err:
        train_in_process(run_dir, *STEPS)
    _one_line(err, "step_00000002.dcp", "nothing was deleted", "resume=PATH")
    assert _snapshot(run_dir / "checkpoints") == before
    assert len(read_rows(run_dir)) == rows


def test_manifest_must_list_every_file_truncated_data_falls_back(run, tmp_path):
    """A manifest that omits the tensor file no longer verifies (the set must be complete): a
    truncated unlisted `__0_0.distcp` falls back to the previous checkpoint, which a resume takes,
    and the damaged one is set aside at the next save, not deleted."""
    run_dir = _copy(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000002.dcp"
    data = next(ckpt.glob("*.distcp"))
    manifest = ckpt / "checksums.sha256"
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines() if data.name not in line))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"skipping unusable checkpoint .*{data.name}: not listed"):
        assert store.latest_valid(run_dir / "checkpoints").name == "step_00000001.dcp"
    with pytest.raises(UserError) as err:
        load_run(ckpt)
    _one_line(err, "not listed in checksums.sha256")
    with pytest.warns(UserWarning, match="set aside as step_00000002.dcp.unverified"):
        train_in_process(run_dir, *STEPS)
    assert (run_dir / "checkpoints" / "step_00000002.dcp.unverified" / data.name).stat().st_size == 100
    assert store.verify(ckpt) is None  # step 2 trained again from step 1


def test_checkpoints_that_is_a_file_is_refused_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    with pytest.raises(UserError) as err:
        train_in_process(run_dir, *STEPS)
    _one_line(err, "checkpoints is a file")
    assert not (run_dir / "metrics.jsonl").exists()


# --- 2. one schema check per file kind, on every load path --------------------------------------


def _edit_json(ckpt: Path, relative: str, edit) -> None:
    path = ckpt / relative
    value = edit(json.loads(path.read_text()))
    path.write_text(json.dumps(value))


def _reseal(ckpt: Path) -> None:
    """Checksums recomputed, as a careless or hostile editor would."""
    (ckpt / "checksums.sha256").unlink()
    write_manifest(ckpt)


def _more_tokens(meta: dict) -> dict:
    tok = json.loads(meta["tokenizer"])
    vocab = tok["model"]["vocab"]
    for i in range(2000):
        vocab[f"extra{i}"] = len(vocab)
    meta["tokenizer"] = json.dumps(tok)
    return meta


EDITS = {
    "meta without config": ("meta.json", lambda m: {k: v for k, v in m.items() if k != "config"}, "no config"),
    "config a list": ("meta.json", lambda m: {**m, "config": [1]}, "'config'"),
    "model_config a list": ("meta.json", lambda m: {**m, "model_config": [1]}, "model_config"),
    "step a string": ("meta.json", lambda m: {**m, "step": "2"}, "'step'"),
    "tokenizer not JSON": ("meta.json", lambda m: {**m, "tokenizer": "{not json"}, "not a tokenizer"),
    "tokenizer larger than the vocabulary": ("meta.json", _more_tokens, "more than the model's vocabulary"),
    "dim 10^7": (
        "meta.json",
        lambda m: {**m, "model_config": {**m["model_config"], "dim": 10**7}},
        "GB of RAM available",
    ),
    "rng file": ("rng/rank_00000.json", lambda r: {"x": 1}, "rng/rank_00000.json"),
    "data state": ("data/shard_00000.json", lambda r: {"x": 1}, "data/shard_00000.json"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_edited_checkpoint_files_are_one_line_on_every_load_path(run, tmp_path, case):
    relative, edit, words = EDITS[case]
    run_dir = _copy(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000002.dcp"
    _edit_json(ckpt, relative, edit)
    _reseal(ckpt)
    loaders = {"resume=PATH": lambda: train_in_process(tmp_path / "other", *STEPS, f"resume={ckpt}")}
    if relative == "meta.json" and case != "meta without config":  # load_run needs no run config
        loaders["load_run"] = lambda: load_run(ckpt)  # pkmlm-eval, -inspect, -harness, -export load through it
        loaders["init_from"] = lambda: train_in_process(tmp_path / "ft", *STEPS, f"init_from={ckpt}")
    for name, load in loaders.items():
        with pytest.raises(UserError) as err:
            load()
        _one_line(err, words)
        assert not (tmp_path / "other" / "metrics.jsonl").exists(), name


def _edited_index(ckpt: Path, change) -> None:
    import pickle

    from pkmlm.checkpoint.safe import load_metadata

    metadata = load_metadata(str(ckpt / ".metadata"), "x")
    change(metadata)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    _reseal(ckpt)


def _point_storage(metadata, where: str) -> None:
    for index, info in metadata.storage_data.items():
        metadata.storage_data[index] = type(info)(where, info.offset, info.length)


def _reshape(metadata) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    key = next(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata))
    entry = metadata.state_dict_metadata[key]
    metadata.state_dict_metadata[key] = TensorStorageMetadata(entry.properties, type(entry.size)([3, 3]), [])


@pytest.mark.parametrize("case", ["/etc/passwd", "fifo", "shape"])
def test_edited_index_is_one_line_and_never_opens_outside_files(run, tmp_path, case):
    run_dir = _copy(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000002.dcp"
    if case == "fifo":
        os.mkfifo(tmp_path / "pipe")
        _edited_index(ckpt, lambda m: _point_storage(m, "../../../pipe"))
        words = "outside the checkpoint"
    elif case == "/etc/passwd":
        _edited_index(ckpt, lambda m: _point_storage(m, "/etc/passwd"))
        words = "outside the checkpoint"
    else:
        _edited_index(ckpt, _reshape)
        words = "in the index, the model"
    for load in (lambda: load_run(ckpt), lambda: train_in_process(tmp_path / "o", *STEPS, f"resume={ckpt}")):
        with pytest.raises(UserError) as err:
            load()
        _one_line(err, words)
    if case != "shape":  # resume=auto skips it (a file that verifies but is no checkpoint's) and takes step 1
        with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
            assert store.latest_valid(run_dir / "checkpoints").name == "step_00000001.dcp"


def test_a_fifo_inside_a_checkpoint_is_refused_without_blocking(run, tmp_path):
    run_dir = _copy(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000002.dcp"
    os.mkfifo(ckpt / "extra")
    assert "not a regular file" in store.verify(ckpt)
    (ckpt / "extra").unlink()
    os.symlink("/etc/passwd", ckpt / "meta2.json")
    assert "a symlink" in store.verify(ckpt)


# --- exports ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(run, tmp_path_factory) -> Path:
    from pkmlm.cli.export import main

    out = tmp_path_factory.mktemp("export") / "exp"
    main([str(run), "--out", str(out)])
    return out


def _write_safetensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("case", ["extra key", "missing key", "config.json a FIFO", "dim 10^7"])
def test_edited_export_is_one_line_on_every_load_path(export, tmp_path, case):
    import torch

    out = _copy(export, tmp_path, "exp")
    if case == "extra key":
        _write_safetensors(out / "model.safetensors", lambda t: t.update(extra=torch.zeros(2)))
        words = "holds 'extra'"
    elif case == "missing key":
        _write_safetensors(out / "model.safetensors", lambda t: t.pop(sorted(t)[-1]))
        words = "which the model needs"
    elif case == "config.json a FIFO":
        (out / "config.json").unlink()
        os.mkfifo(out / "config.json")
        words = "FIFO"
    else:
        info = json.loads((out / "config.json").read_text())
        info["model_config"]["dim"] = 10**7
        (out / "config.json").write_text(json.dumps(info))
        words = "GB of RAM available"
    for load in (lambda: load_run(out), lambda: train_in_process(tmp_path / "ft", *STEPS, f"init_from={out}")):
        with pytest.raises(UserError) as err:
            load()
        _one_line(err, words)


# --- 3. pkmlm-export never overwrites -----------------------------------------------------------


def test_export_refuses_non_empty_and_run_directories_and_writes_atomically(run, tmp_path, capsys):
    from pkmlm.cli.export import main

    run_dir = _copy(run, tmp_path)
    before = _snapshot(run_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's file")
    for out, words in ((mine, "not empty"), (run_dir, "a run directory"), (run_dir / "checkpoints" / "x", "inside")):
        with pytest.raises(SystemExit) as exit_:
            main([str(run_dir), "--out", str(out)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert (mine / "notes.txt").read_text() == "the user's file"
    assert _snapshot(run_dir) == before
    main([str(run_dir), "--out", str(mine), "--force"])  # replaced only once the export is complete
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, as a full disk refuses): one line, exit 2, no
    half-written export and no temporary left."""
    import resource

    out = tmp_path / "exp"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "pkmlm.cli.export", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "nothing was written" in lines[0], proc.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.iterdir())


# --- recall files -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["non-UTF-8", "answer longer than the window"])
def test_recall_file_checked_before_training_and_evaluation(run, tmp_path, case):
    qa = tmp_path / "qa.jsonl"
    if case == "non-UTF-8":
        qa.write_bytes(b'{"prompt": "a", "answer": "\xff\xfe", "n_values": 2}\n')
        words = "not UTF-8"
    else:
        qa.write_text(json.dumps({"prompt": "a", "answer": "word " * 200, "n_values": 2}) + "\n")
        words = "longer than the model's window"
    with pytest.raises(UserError) as err:
        train_in_process(tmp_path / "new", *STEPS, f"eval.recall={qa}")
    _one_line(err, words)
    assert not (tmp_path / "new" / "metrics.jsonl").exists()
    if case == "non-UTF-8":  # read by the same function in pkmlm-eval, before the run loads
        return
    proc = run_cli("pkmlm.cli.eval", [f"checkpoint={run}", f"eval.recall={qa}"], cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-2000:]


# --- 4. pkmlm-harness: every argument and the tasks' data before the model loads -----------------


def _harness_task(root: Path, data: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(
        f"task: tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
    )
    return tasks


@pytest.mark.parametrize("case", ["--limit inf", "--device cuda", "--device gpu", "missing data file"])
def test_harness_arguments_are_one_line_before_the_model_loads(tmp_path, capsys, case):
    """RUN is an empty directory: had the model been loaded first, the error would name RUN. (The
    data-file case indexes lm-eval's own tasks too: about 12 s.)"""
    import torch

    from pkmlm.cli.harness import main

    if case == "--device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir = tmp_path / "not_a_run"
    run_dir.mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)))
    tasks = _harness_task(tmp_path, data)
    args = [str(run_dir), "--tasks", "tiny", "--include-path", str(tasks), "--output", str(tmp_path / "r.json")]
    extra, words = {
        "--limit inf": (["--limit", "inf"], "--limit=inf"),
        "--device cuda": (["--device", "cuda"], "no CUDA"),
        "--device gpu": (["--device", "gpu"], "auto, cpu, cuda or cuda:N"),  # train.device's values
        "missing data file": ([], "cannot load the task data"),
    }[case]
    if case == "missing data file":
        data.unlink()
    with pytest.raises(SystemExit) as exit_:
        main(args + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and words in err[0] and "not_a_run" not in err[0], err


def test_harness_num_fewshot_beyond_a_tasks_documents_is_one_line(tmp_path):
    """`check_tasks`, which `run_harness` calls before the model loads (only the local task indexed)."""
    from lm_eval.tasks import TaskManager

    from pkmlm.harness import check_tasks

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)))
    manager = TaskManager(include_path=str(_harness_task(tmp_path, data)), include_defaults=False)
    check_tasks(manager, ["tiny"], 2)  # 2 of the other documents: fine
    with pytest.raises(UserError) as err:
        check_tasks(manager, ["tiny"], 5)
    _one_line(err, "--num-fewshot=5", "has only 3 documents")


# --- pkmlm-facts and pkmlm-inspect --------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [(["--people", "1000000000"], "more than the limit"), (["--people", "10", "--templates", "1000000000"], "limit")],
)
def test_facts_refuses_a_corpus_beyond_its_limit_before_generating(tmp_path, capsys, args, words):
    from pkmlm.cli.facts import main

    with pytest.raises(SystemExit) as exit_:
        main([*args, "--seed", "1", "--out", str(tmp_path / "facts")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "facts").exists()


def test_facts_estimate_matches_the_written_size(tmp_path):
    from pkmlm.knowledge.facts import estimate_corpus, write_corpus

    write_corpus(tmp_path, 200, 3, 2)
    written = sum((tmp_path / name).stat().st_size for name in ("bios.jsonl", "qa.jsonl"))
    assert abs(estimate_corpus(200, 2, 3)["disk"] - written) < 0.1 * written


def test_inspect_says_which_checkpoint_it_skips(run, tmp_path, capsys):
    import torch

    from pkmlm.cli.inspect import checkpoint_history

    run_dir = _copy(run, tmp_path)
    _edit_json(run_dir / "checkpoints" / "step_00000001.dcp", "meta.json", lambda m: {**m, "step": "1"})
    _reseal(run_dir / "checkpoints" / "step_00000001.dcp")
    batches = [torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))]
    points = checkpoint_history(run_dir, batches, torch.device("cpu"), progress=False)
    assert [p["step"] for p in points] == [2]
    err = capsys.readouterr().err
    assert "skipping checkpoint step_00000001.dcp" in err and "'step'" in err


def test_second_ctrl_c_during_a_checkpoint_write_lets_the_write_finish(tmp_path, capsys):
    """Real SIGINTs to this process: the first asks for a stop, a second during the write is
    deferred (the checkpoint verifies), then one line; outside a write it is a KeyboardInterrupt."""
    import signal

    import torch

    from pkmlm.train.loop import StopSignals

    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == "SIGINT"
        with pytest.raises(UserError) as err, signals.writing(4):
            os.kill(os.getpid(), signal.SIGINT)
            store.write(tmp_path, 4, {"meta": {"tokens": 0}, "weights": torch.ones(3)})
        _one_line(err, "second Ctrl-C", "step 4 was written completely")
        assert store.verify(tmp_path / "step_00000004.dcp") is None
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert "finishing the write first" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs between bytecodes
                pass
