"""The checkpoint store and what reads it: nothing read from a run directory runs code (crafted
pickles with valid checksums refused with one line on every load path), files that are no
checkpoint and old single-file checkpoints are one line, `pkmlm-export` gives the same logits,
`pkmlm.generate`, wandb resume continues its run, and a stop signal is reported without the
progress bar."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_STEPS
from helpers import eval_in_process, run_cli, train_in_process

from pkmlm.checkpoint import store
from pkmlm.checkpoint.files import write_manifest
from pkmlm.config import register_configs
from pkmlm.errors import UserError
from pkmlm.run import generate, load_run

register_configs()
STEPS = TINY_RUN_STEPS


def _train(run_dir: Path, *extra: str) -> dict:
    return train_in_process(run_dir, *extra)


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run  # trained with STEPS (conftest.TINY_RUN_STEPS), once for the session


class Payload:
    """Unpickling this runs code: it writes the marker file (what an attacker's payload would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _craft(run_dir: Path, where: str, marker: Path) -> Path:
    """Put a payload into the newest checkpoint of `run_dir`, checksums recomputed (valid)."""
    ckpt = run_dir / "checkpoints" / "step_00000002.dcp"
    if where == ".metadata":  # the pickled index of the tensors
        import pickle

        (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        (ckpt / "checksums.sha256").unlink()
        write_manifest(ckpt)
    else:  # a value inside the tensor files, under a key every loader reads
        state = store.read(ckpt)
        if where == "model":
            key = next(iter(state["model"]))
            state["model"][key] = Payload(marker)
        else:
            state["optim"]["param_groups"][0]["lr"] = Payload(marker)
        shutil.rmtree(ckpt)
        store.write(run_dir / "checkpoints", 2, state, keep_last=2)
    assert store.verify(ckpt) is None  # valid checksums: integrity is not origin
    return ckpt


@pytest.mark.parametrize("where", [".metadata", "model", "optim"])
def test_crafted_checkpoint_runs_no_code_on_any_load_path(run, tmp_path, where):
    run_dir = _copy(run, tmp_path)
    marker = tmp_path / "MARKER"
    ckpt = _craft(run_dir, where, marker)
    loaders = {
        "resume=auto": lambda: _train(run_dir, *STEPS[1:], "train.max_steps=3"),
        "resume=PATH": lambda: _train(tmp_path / "other", *STEPS[1:], "train.max_steps=3", f"resume={ckpt}"),
    }
    if where != "optim":  # load_run, pkmlm-eval and init_from read the model alone
        loaders["load_run"] = lambda: load_run(run_dir)
        loaders["init_from"] = lambda: _train(tmp_path / "finetune", *STEPS, f"init_from={run_dir}")
    for name, load in loaders.items():
        with pytest.raises(UserError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and str(ckpt) in message and "refused" in message, (name, message)
        assert not marker.exists(), name
    if where != "optim":
        proc = run_cli("pkmlm.cli.eval", [f"checkpoint={run_dir}"], cwd=tmp_path, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "refused" in lines[0], proc.stderr[-2000:]
        assert not marker.exists()


@pytest.mark.parametrize("file", ["meta.json", ".metadata"])
def test_valid_checksums_but_no_checkpoint_is_one_line(run, tmp_path, file):
    """A torch file (or JSON of another shape) with a valid checksum where a checkpoint's file
    belongs: one line and exit 2 when given; skipped with a warning by resume=auto."""
    run_dir = _copy(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000002.dcp"
    if file == "meta.json":
        (ckpt / "meta.json").write_text('{"something": "else"}')
    else:
        import io

        buffer = io.BytesIO()
        torch.save({"weights": torch.ones(3)}, buffer)
        (ckpt / ".metadata").write_bytes(buffer.getvalue())
    (ckpt / "checksums.sha256").unlink()
    write_manifest(ckpt)
    with pytest.raises(UserError, match=f"resume=.*{file}.*not a"):
        _train(tmp_path / "other", *STEPS, f"resume={ckpt}")
    proc = run_cli("pkmlm.cli.eval", [f"checkpoint={ckpt}"], cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "not a" in lines[0] and "Traceback" not in proc.stderr
    with pytest.warns(UserWarning, match="skipping unusable checkpoint .*step_00000002"):
        assert store.latest_valid(run_dir / "checkpoints").name == "step_00000001.dcp"


def test_old_single_file_checkpoints_are_refused_with_one_line(tmp_path):
    old = tmp_path / "run" / "checkpoints"
    old.mkdir(parents=True)
    torch.save({"step": 1}, old / "step_00000001.pt")
    for load in (
        lambda: store.resolve("auto", tmp_path / "run"),
        lambda: load_run(tmp_path / "run"),
        lambda: store.resolve(str(old / "step_00000001.pt"), tmp_path),
    ):
        with pytest.raises(UserError, match="step_00000001.pt: a single-file checkpoint of an earlier pkmlm"):
            load()


def test_export_loads_with_the_same_logits(run, tmp_path):
    proc = run_cli("pkmlm.cli.export", [str(run), "--out", str(tmp_path / "export")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    original, exported = load_run(run), load_run(tmp_path / "export")
    assert exported.step == original.step == 2 and exported.config == original.config
    ids = torch.tensor([original.tokenizer.encode("The memory layer reads a few values.").ids])
    torch.testing.assert_close(exported.model(ids)[0], original.model(ids)[0], rtol=0, atol=0)
    assert exported.tokenizer.to_str() == original.tokenizer.to_str()
    bad = run_cli("pkmlm.cli.export", [str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_generate_is_greedy_at_temperature_zero_and_seeded_otherwise(run):
    loaded = load_run(run)
    prompt = loaded.tokenizer.encode("The").ids
    greedy = generate(loaded.model, prompt, max_new_tokens=5, temperature=0)
    # Greedy decoding equals the argmax of the model's own next-token logits, one token at a time.
    ids = list(prompt)
    for _ in range(5):
        ids.append(int(loaded.model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert greedy == ids[len(prompt) :]

    def sample(seed: int) -> list[int]:
        return generate(
            loaded.model, prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(seed)
        )

    assert sample(0) == sample(0) and len(sample(0)) == 8
    assert all(0 <= t < loaded.model.cfg.vocab_size for t in sample(1))


def test_resumed_run_continues_its_wandb_run(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    steps = (*STEPS, "train.max_steps=3", "logging.wandb.mode=offline")
    _train(run_dir, *steps, "train.stop_at_step=1")
    first = store.read_meta(store.latest_valid(run_dir / "checkpoints"))["wandb_run_id"]
    _train(run_dir, *steps)
    assert store.read_meta(store.latest_valid(run_dir / "checkpoints"))["wandb_run_id"] == first
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{first}") for name in runs), runs  # one id, two segments


def test_stop_signal_is_reported_without_the_progress_bar(tmp_path, monkeypatch, capsys):
    """logging.progress=false (the test preset's): the SIGTERM line still reaches stderr and the
    summary names the stop reason."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's StopSignals: a flag
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_signal)
    summary = _train(
        tmp_path / "run", "train.max_steps=50", "checkpoint.interval=100", "eval.interval=100", "logging.progress=false"
    )
    out, err = capsys.readouterr()
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 2
    assert "SIGTERM received: checkpoint written at step 2" in err
    assert "stopped by     SIGTERM" in out


def test_eval_reads_an_export_with_the_same_loss_as_its_run(run, tmp_path):
    """`pkmlm-eval checkpoint=EXPORT_DIR` (promised by pkmlm-export and docs/architecture.md):
    the same numbers as on the run it came from, on the run's own validation split."""

    from pkmlm.run import export_run

    export = export_run(load_run(run), tmp_path / "export")
    results = []
    for source in (run, export):  # pkmlm-eval's evaluation, in this process
        results.append(eval_in_process(f"checkpoint={source}", "max_batches=2"))
    on_run, on_export = results
    assert on_run["tokens"] > 0 and on_export["tokens"] == on_run["tokens"]
    assert on_export["loss"] == on_run["loss"] and on_export["ppl"] == on_run["ppl"]


def test_the_clis_import_the_checkpoint_reader_only_when_they_read_one():
    """torch.distributed.checkpoint (and with it DTensor) is ~1 s of a CLI's start-up: imported where a
    checkpoint is read or written (`store`'s functions), not when a CLI module loads, so a one-line
    refusal of a bad value comes without it."""
    clis = ", ".join(f"pkmlm.cli.{m}" for m in ("train", "eval", "prepare", "compare", "inspect", "export", "facts"))
    code = f"import sys, pkmlm, {clis}; loaded = 'torch.distributed.checkpoint' in sys.modules; assert not loaded"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
