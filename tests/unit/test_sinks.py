"""Logging sinks: metrics.jsonl writing and crash-tolerant reading, console progress, wandb."""

import io
import json
import math
import os
import sys
import warnings

import pytest
import torch

from pkmlm.errors import ConfigError, UserError
from pkmlm.metrics.sinks import (
    ConsoleProgress,
    MetricsFile,
    Sinks,
    WandbSink,
    format_summary,
    latest_by_step,
    read_metrics,
)


def _read_strict(path):
    """read_metrics, failing the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_metrics(path, dedupe=False)


# ---------------------------------------------------------------- metrics.jsonl


def test_rows_are_appended_one_json_object_per_line(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsFile(path) as metrics:
        metrics.write({"step": 1, "tokens": 64, "train/loss": 4.5, "train/lr": 1e-3})
        metrics.write({"step": 2, "tokens": 128, "train/loss": torch.tensor(4.25)})
    with MetricsFile(path) as metrics:  # a second session appends, never truncates
        metrics.write({"step": 3, "tokens": 192, "val/ppl": 70.0})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[1])["train/loss"] == 4.25
    assert _read_strict(path)[2] == {"step": 3, "tokens": 192, "val/ppl": 70.0}


def test_non_finite_floats_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsFile(path) as metrics:
        metrics.write(
            {
                "step": 1,
                "tokens": 8,
                "a": math.nan,
                "b": math.inf,
                "c": -math.inf,
                "d": torch.tensor(float("nan")),
                "e": 1.5,
            }
        )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert row == {"step": 1, "tokens": 8, "a": None, "b": None, "c": None, "d": None, "e": 1.5}


@pytest.mark.parametrize("row", [{"tokens": 8, "x": 1.0}, {"step": 1, "x": 1.0}])
def test_row_without_step_or_tokens_is_refused(tmp_path, row):
    with MetricsFile(tmp_path / "metrics.jsonl") as metrics:
        with pytest.raises(ValueError, match="lacks"):
            metrics.write(row)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_torn_last_line_is_skipped_silently(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsFile(path) as metrics:
        metrics.write({"step": 1, "tokens": 8})
        metrics.write({"step": 2, "tokens": 16})
    with open(path, "ab") as f:  # a crash in the middle of the third write
        f.write(b'{"step": 3, "tokens": 2')
    assert [row["step"] for row in _read_strict(path)] == [1, 2]
    # a complete last row whose newline is missing (hand-edited) is still read
    path2 = tmp_path / "edited.jsonl"
    path2.write_text('{"step": 1, "tokens": 8}\n{"step": 2, "tokens": 16}')
    assert [row["step"] for row in _read_strict(path2)] == [1, 2]


def test_reopening_after_a_torn_line_keeps_new_rows_intact(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsFile(path) as metrics:
        metrics.write({"step": 1, "tokens": 8})
    with open(path, "ab") as f:
        f.write(b'{"step": 2, "tok')
    with MetricsFile(path) as metrics:  # the resumed run
        metrics.write({"step": 2, "tokens": 16})
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: skipping unparsable line"):
        rows = read_metrics(path)
    assert rows == [{"step": 1, "tokens": 8}, {"step": 2, "tokens": 16}]


def test_resume_dedupe_takes_the_rerun_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsFile(path) as metrics:
        for step in range(1, 6):  # first attempt: steps 1..5, eval at 4, crash after 5
            metrics.write({"step": step, "tokens": 8 * step, "train/loss": 10.0 - step})
            if step == 4:
                metrics.write({"step": 4, "tokens": 32, "val/ppl": 99.0})
    with MetricsFile(path) as metrics:  # resumed from the checkpoint at step 3
        for step in range(4, 7):
            metrics.write({"step": step, "tokens": 8 * step, "train/loss": 20.0 - step})
    rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["train/loss"] for row in rows] == [9.0, 8.0, 7.0, 16.0, 15.0, 14.0]
    assert not any("val/ppl" in row for row in rows)  # the step-4 eval belonged to the lost run
    assert len(read_metrics(path, dedupe=False)) == 9


def test_dedupe_same_step_same_keys_replaces_different_keys_kept():
    # logging every 10 steps: the old run logged step 20 then crashed before 30; the resumed run
    # (checkpoint at 10) logs step 20 again: not lower than the last step, but the same row kind.
    rows = [
        {"step": 10, "tokens": 1, "train/loss": 5.0},
        {"step": 10, "tokens": 1, "val/loss": 5.1, "val/ppl": 164.0},
        {"step": 20, "tokens": 2, "train/loss": 4.0},
        {"step": 20, "tokens": 2, "train/loss": 4.5},
        {"step": 30, "tokens": 3, "train/loss": 3.5},
    ]
    assert latest_by_step(rows) == [rows[0], rows[1], rows[3], rows[4]]
    assert latest_by_step([]) == []


def test_reader_skips_rows_without_an_integer_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "tokens": 1}\n[1, 2]\n{"tokens": 3}\n{"step": 2, "tokens": 2}\n')
    with pytest.warns(UserWarning, match="integer step"):
        rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2]


# ---------------------------------------------------------------- console


def test_console_plain_lines_when_not_a_tty():
    out = io.StringIO()
    console = ConsoleProgress(total_steps=10, initial_step=2, file=out, log_interval_s=0.0)
    assert not console.tty
    console.update(5, loss=3.14159, lr=3e-4, tokens_per_s=45_100)
    console.write("eval: ppl 12.3")
    console.update(10)
    console.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 5/10 (50%) | loss 3.1416 | lr 3.00e-04 | 45.1k tok/s | ")
    assert "elapsed" in lines[0] and "left" in lines[0]
    assert lines[1] == "eval: ppl 12.3"
    assert lines[2].startswith("step 10/10 (100%)")
    assert "\r" not in out.getvalue()


def test_console_plain_lines_are_rate_limited():
    out = io.StringIO()
    console = ConsoleProgress(total_steps=100, file=out, log_interval_s=3600.0)
    for step in range(1, 50):
        console.update(step, loss=1.0)
    assert len(out.getvalue().splitlines()) == 1  # the first update prints, then waits an hour
    console.update(100, loss=1.0)  # the last step always prints
    assert len(out.getvalue().splitlines()) == 2


def test_console_bar_on_a_tty():
    out = io.StringIO()
    console = ConsoleProgress(total_steps=10, file=out, tty=True)
    console.update(3, loss=2.5, lr=1e-3, tokens_per_s=1234.0)
    console.write("hello")
    console.close()
    text = out.getvalue()
    assert "3/10" in text and "loss=2.5000" in text and "hello" in text


def test_console_disabled_prints_nothing():
    out = io.StringIO()
    console = ConsoleProgress(total_steps=10, file=out, tty=True, enabled=False)
    console.update(3, loss=2.5)
    console.write("hello")
    console.close()
    assert out.getvalue() == ""


# ---------------------------------------------------------------- wandb


def test_wandb_disabled_never_imports_wandb(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    sink = WandbSink("disabled", project="p", name="n", group=None, config={}, dir=tmp_path)
    sink.log({"step": 1, "tokens": 2, "x": 1.0})
    sink.summary({"x": 1.0})
    sink.close()
    assert sink.run_id is None
    assert list(tmp_path.iterdir()) == []


def test_wandb_bad_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="logging.wandb.mode"):
        WandbSink("sometimes", project="p", name=None, group=None, config={}, dir=tmp_path)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No credentials, no user config, quiet: wandb only sees tmp_path."""
    pytest.importorskip("wandb")
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    return tmp_path


@pytest.mark.timeout(120)
def test_wandb_offline_writes_a_local_run(wandb_env):
    run_dir = wandb_env / "run"
    sink = WandbSink(
        "offline",
        project="pkmlm-test",
        name="tiny",
        group="g",
        config={"model": {"dim": 8}},
        dir=run_dir,
        tags=["test"],
    )
    assert sink.run_id
    sink.log({"step": 1, "tokens": 64, "train/loss": 4.0})
    sink.log({"step": 1, "tokens": 64, "val/ppl": math.nan})
    sink.log({"tokens": 128, "train/loss": 3.0}, step=2)
    sink.summary({"val/ppl": 40.0})
    sink.close()
    sink.close()  # idempotent
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


@pytest.mark.timeout(120)
def test_wandb_online_without_credentials_is_a_user_error(wandb_env):
    with pytest.raises(UserError, match="logging.wandb.mode=offline") as info:
        WandbSink("online", project="pkmlm-test", name=None, group=None, config={}, dir=wandb_env / "run")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- fan-out and summary


class RecordingWandb:
    def __init__(self):
        self.rows, self.summaries, self.closed = [], [], None

    def log(self, row, step=None):
        self.rows.append(dict(row))

    def summary(self, values):
        self.summaries.append(dict(values))

    def close(self, exit_code=0):
        self.closed = exit_code


def test_sinks_fan_out_and_close(tmp_path):
    recorder = RecordingWandb()
    out = io.StringIO()
    with Sinks(MetricsFile(tmp_path / "metrics.jsonl"), ConsoleProgress(10, file=out), recorder) as sinks:
        sinks.log({"step": 1, "tokens": 8, "train/loss": 2.0})
        sinks.summary({"val/ppl": 3.0})
    assert recorder.rows == [{"step": 1, "tokens": 8, "train/loss": 2.0}]
    assert recorder.summaries == [{"val/ppl": 3.0}]
    assert recorder.closed == 0
    assert _read_strict(tmp_path / "metrics.jsonl") == recorder.rows
    with pytest.raises(ValueError, match="closed"):
        sinks.metrics_file.write({"step": 2, "tokens": 9})


def test_sinks_close_reports_failure_after_closing_the_rest(tmp_path):
    class Broken(RecordingWandb):
        def close(self, exit_code=0):
            raise OSError("wandb is gone")

    sinks = Sinks(MetricsFile(tmp_path / "metrics.jsonl"), ConsoleProgress(10, enabled=False), Broken())
    with pytest.raises(OSError, match="wandb is gone"):
        sinks.close()
    assert sinks.metrics_file._fd is None


def test_format_summary_lists_every_memory_layer_and_the_run_dir():
    metrics = {"step": 1000, "tokens": 12_345_678, "val/loss": 3.4567, "val/ppl": 31.71, "wall_time_s": 3723.0}
    for i in (2, 10, 5):
        metrics |= {
            f"memory/layer{i}/usage": 0.873,
            f"memory/layer{i}/kl_weight": 0.41,
            f"memory/layer{i}/kl_count": None,
            f"memory/layer{i}/head0/usage": 0.5,
        }
    text = format_summary(metrics, "/runs/tiny/2025-01-01")
    assert "/runs/tiny/2025-01-01" in text
    assert "3.4567" in text and "31.71" in text and "12.3M" in text and "1h02m03s" in text
    layer_lines = [line for line in text.splitlines() if line.strip().startswith("layer ")]
    assert [line.split()[1] for line in layer_lines] == ["2", "5", "10"]
    assert "87.3%" in layer_lines[0] and "0.4100" in layer_lines[0] and "n/a" in layer_lines[0]


def test_format_summary_dense_model_and_missing_values():
    text = format_summary({"loss": math.nan, "tokens": 10}, "out")
    assert "n/a" in text and "out" in text and "layer" not in text


def test_metrics_file_given_a_run_directory_writes_metrics_jsonl(tmp_path):
    with MetricsFile(tmp_path) as metrics:
        metrics.write({"step": 1, "tokens": 8})
    assert _read_strict(tmp_path / "metrics.jsonl") == [{"step": 1, "tokens": 8}]


def test_sinks_as_the_loop_holds_them_mark_a_failed_run_and_keep_its_error(tmp_path):
    """The loop's `with sinks:`: an error inside closes wandb with exit code 1, and a sink that
    fails to close does not replace the run's own error."""

    class Broken(RecordingWandb):
        def close(self, exit_code=0):
            super().close(exit_code)
            raise OSError("wandb is gone")

    broken = Broken()
    with pytest.raises(RuntimeError, match="the run's own error"):
        with Sinks(MetricsFile(tmp_path / "metrics.jsonl"), ConsoleProgress(10, enabled=False), broken):
            raise RuntimeError("the run's own error")
    assert broken.closed == 1


def test_notice_reaches_stderr_without_the_progress_bar_on_the_main_rank_only(capsys):
    for main in (True, False):
        sinks = Sinks(None, ConsoleProgress(10, enabled=False), None, main=main)
        sinks.notice("SIGTERM received: checkpoint written at step 3")
        sinks.console.write("only with the progress bar")
        sinks.log({"step": 1, "tokens": 1})  # no metrics file on other ranks: nothing written
        sinks.close()
        err = capsys.readouterr().err
        assert err == ("SIGTERM received: checkpoint written at step 3\n" if main else "")
