"""The knowledge sweep (pkmlm.knowledge.sweep): its arms, and resuming a sweep stopped part-way."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from pkmlm.knowledge import decay, sweep, sweep_report
from pkmlm.model import Transformer


def test_parameter_matched_dense_arm_has_the_128_squared_memory_models_parameters():
    mult = sweep.param_matched_ffn_mult([])
    dense, _ = sweep._total_params(["experiment=knowledge/dense", f"model.ffn_mult={mult!r}"])
    mem, _ = sweep._total_params(["experiment=knowledge/mem", *sweep.memory_overrides(128)])
    base, model = sweep._total_params(["experiment=knowledge/dense"])
    per_unit = 2 * model.n_layers * model.dim  # one more FFN unit: a column of up, a row of down per layer
    assert abs(dense - mem) <= per_unit // 2 and dense > 4 * base
    assert sweep.arm_spec("dense_pm", []) == ("knowledge/dense", [f"model.ffn_mult={mult!r}"])
    assert sweep.arm_spec("mem256", [])[1][0] == "model.memory.n_keys=256"
    with pytest.raises(SystemExit, match="unknown arm 'mem512'"):
        sweep.arm_spec("mem512", [])
    # A preset of the family is an arm by its name (Engram's, issue 23), at the 128^2 arm's table size
    assert sweep.arm_spec("engram", []) == ("knowledge/engram", [])
    _, engram = sweep._total_params(["experiment=knowledge/engram"])
    assert Transformer(engram).count_parameters()["side_tables"] == pytest.approx(128**2 * engram.dim, rel=0.02)


def test_the_ffn_mult_for_a_width_builds_that_width_at_any_dim():
    assert sweep.ffn_mult_for(4419, 64) == 4419 / 64  # exact: kept as it is (the sweep's dense_pm commands)
    assert int(29 / 100 * 100) == 28  # the plain quotient truncates one short ...
    assert int(sweep.ffn_mult_for(29, 100) * 100) == 29  # ... the helper's does not
    assert all(int(sweep.ffn_mult_for(h, d) * d) == h for d in (64, 100, 96, 120, 1000) for h in range(1, 5000))


def test_dense_saturation_compares_mean_bits_at_twice_the_exposures():
    def row(seed, step, bits):
        return {"arm": "dense", "people": 400, "seed": seed, "step": step, "steps_equal": 8, "recall/bits": bits}

    assert sweep.dense_saturated([row(0, 8, 100.0), row(0, 16, 104.0), row(1, 8, 100.0), row(1, 16, 105.0)], 400)
    assert not sweep.dense_saturated([row(0, 8, 100.0), row(0, 16, 110.0)], 400)
    assert not sweep.dense_saturated([row(0, 8, 100.0)], 400)  # no 2x checkpoint: not shown saturated


def _snapshot(run_dir):
    """Every file of a run directory with its modification time and size."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.is_file()
    }


@pytest.mark.slow
def test_a_sweep_stopped_part_way_resumes_without_redoing_finished_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = [
        "--people", "4", "--seeds", "0", "--exposures", "1", "--arms", "dense,mem", "--dense-factor", "1",
        "--max-runs", "1", "--jobs", "1", "--step-time-repeats", "2", "--out", str(out), "data.val_docs=2",
    ]  # fmt: skip
    # Sitting 1: --max-runs 1 trains the first run (dense) and stops; the mem run is not started.
    sweep.main(argv)
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("N=4:"))
    assert line.startswith("N=4: 2 runs, 2 unfinished (~") and line.endswith(", 1 to train now")  # both runs' hours
    dense_dir, mem_dir = out / "runs" / "dense-N4-s0", out / "runs" / "mem-N4-s0"
    plans = sweep.plan_level(sweep.parse_args(argv), out.resolve(), 4)
    plan = {p["arm"]: p for p in plans}
    max_steps = {p["arm"]: p["max_steps"] for p in plans}
    assert sweep.run_finished(plan["dense"]) and not mem_dir.exists()
    cache = (dense_dir / "sweep_recall.jsonl").read_text().splitlines()
    assert len(cache) == sweep.CHECKPOINTS_PER_RUN
    dense_files = _snapshot(dense_dir)
    step_times = out / "step_times.json"  # both arms' reference step times, measured in sitting 1
    assert sorted(json.loads(step_times.read_text())["step_ms"]) == ["dense", "mem"]
    step_times_stat = step_times.stat().st_mtime_ns
    # The mem run is then left half-finished, as a sweep killed in the middle of it leaves it.
    mem_plan = plan["mem"]
    half = max_steps["mem"] // 2
    import subprocess

    subprocess.run([*mem_plan["command"], f"train.stop_at_step={half}"], check=True, capture_output=True)
    assert not sweep.run_finished(mem_plan)
    half_ckpt = mem_dir / "checkpoints" / f"step_{half:08d}.dcp"
    half_files = {k: v for k, v in _snapshot(mem_dir).items() if k.startswith(f"checkpoints/{half_ckpt.name}")}
    assert half_files
    # Sitting 2, the same command: the finished dense run and its evaluations are left alone, the mem
    # run resumes from its checkpoint (its step-`half` checkpoint is not rewritten) and finishes.
    sweep.main(argv)
    assert _snapshot(dense_dir) == dense_files
    assert sweep.run_finished(mem_plan)
    assert {k: v for k, v in _snapshot(mem_dir).items() if k in half_files} == half_files
    # Each step trained once: steps 1..half before the stop, the rest after the resume, none twice.
    trained = [row["step"] for row in map(json.loads, (mem_dir / "metrics.jsonl").read_text().splitlines())]
    trained = [
        s for s, line in zip(trained, (mem_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in line
    ]
    assert trained == list(range(1, max_steps["mem"] + 1))
    # Sitting 3: nothing left to train or evaluate; the results hold both runs' checkpoints, and
    # --results writes the README's table as a results file with the commit the runs ran at.
    mem_files = _snapshot(mem_dir)
    archive = tmp_path / "archive.jsonl"  # outside the sweep directory, as a committed file is
    sweep.main([*argv, "--results", str(tmp_path / "knowledge.json"), "--archive", str(archive)])
    assert _snapshot(dense_dir) == dense_files and _snapshot(mem_dir) == mem_files
    assert step_times.stat().st_mtime_ns == step_times_stat  # measured once per sweep directory
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    step_ms = json.loads(step_times.read_text())["step_ms"]
    assert all(r["ref_time_s"] == pytest.approx(r["step"] * step_ms[r["arm"]] / 1e3) for r in rows)
    assert sorted({r["arm"] for r in rows}) == ["dense", "mem"]
    assert len(rows) == 2 * sweep.CHECKPOINTS_PER_RUN
    table = (out / "table.md").read_text()
    assert "| 4 |" in table and "dense (equal exposures)" in table and "mem (equal exposures)" in table
    from pkmlm import results
    from pkmlm.train.rundir import code_version

    result = results.load(str(tmp_path / "knowledge.json"))
    commit = str(code_version()["commit"])[:7]
    assert "--results" in result.command and result.commit == commit and f"runs trained at {commit}" in result.note
    # The dense arm at the mem arm's time only where dense ran that long: with --dense-factor 1 that
    # depends on which of the two measured step times was the longer (on a loaded machine, either).
    mem_end = next(r for r in rows if r["arm"] == "mem" and r["step"] == r["steps_equal"])
    equal_time = sweep_report.equal_time_pick(mem_end, [r for r in rows if r["arm"] == "dense"]) is not None
    labels = ["dense (equal exposures)", *["dense (equal time to mem)"] * equal_time, "mem (equal exposures)"]
    assert [row[2] for row in result.rows] == labels
    assert results.render_table(result).count("\n| 4 |") == len(labels)
    # Where the bits go, beside it: the mem run's table read while answering the questions, measured
    # once (sitting 2's report) and kept in the run; the dense arm has no table to read.
    attributes = sweep_report.attribute_results_path(tmp_path / "knowledge.json")
    where = {row[1]: row for row in results.load(str(attributes)).rows}
    assert where["dense (equal exposures)"][-3:] == ["n/a"] * 3
    usage = [json.loads(line) for line in (mem_dir / "sweep_usage.jsonl").read_text().splitlines()]
    assert [u["step"] for u in usage] == [max_steps["mem"]] and 0.0 < usage[0]["usage"]["usage"] <= 1.0
    assert where["mem (equal exposures)"][-3] == format(usage[0]["usage"]["usage"], ".1%")
    assert not (dense_dir / "sweep_usage.jsonl").exists()
    # ... and it is the reads of the questions' own tokens: the same as one question at a time (no padding)
    from pkmlm.metrics.continuations import score_continuations
    from pkmlm.metrics.memory_usage import memory_metrics, track_memory_usage
    from pkmlm.metrics.recall import read_questions, recall_requests
    from pkmlm.run import load_run

    run = load_run(mem_dir / "checkpoints" / f"step_{max_steps['mem']:08d}.dcp")
    with track_memory_usage(run.model) as trackers:
        for context, answer in recall_requests(run.tokenizer, read_questions(Path(mem_plan["facts"]) / "qa.jsonl")):
            score_continuations(run.model, [(context, answer)], max_len=len(context) + len(answer), batch_size=1)
    alone = memory_metrics(trackers)
    assert usage[0]["usage"]["usage"] == alone["memory/layer1/usage"]
    assert usage[0]["usage"]["kl_count"] == pytest.approx(alone["memory/layer1/kl_count"], rel=1e-6)
    # Sitting 4, on a machine that lost the sweep directory (a reset), from another checkout and
    # into a sweep directory of another name (relative, and named like the experiments' folder):
    # the same command with the archive restores both finished runs instead of training them (no job
    # is started, no step time measured) and reports the same table, the usage and the commits the
    # runs were trained at.
    import shutil

    table_before, rows_before = (out / "table.md").read_text(), (out / "results.jsonl").read_text()
    step_times_before = json.loads(step_times.read_text())
    shutil.rmtree(out)
    monkeypatch.setattr(sweep, "run_jobs", lambda jobs, *a: pytest.fail(f"trained again: {jobs}") if jobs else [])
    monkeypatch.setattr(sweep, "measure_step_times", lambda *a, **k: pytest.fail("step times measured again"))
    monkeypatch.setattr(sweep.sys, "executable", "/another/checkout/.venv/bin/python")  # the same runs
    monkeypatch.chdir(tmp_path)
    argv = [*argv[: argv.index("--out")], "--out", "knowledge", *argv[argv.index("--out") + 2 :]]
    moved, out = out, (tmp_path / "knowledge").resolve()
    step_times = out / "step_times.json"
    dense_dir, mem_dir = out / "runs" / "dense-N4-s0", out / "runs" / "mem-N4-s0"
    sweep.main([*argv, "--results", str(tmp_path / "again.json"), "--archive", str(archive)])
    err = capsys.readouterr().err
    assert "N=4: 2 finished runs restored from" in err and "N=4: 2 runs, 0 unfinished" in err
    assert not (dense_dir / "checkpoints").exists() and not (mem_dir / "checkpoints").exists()
    assert (out / "results.jsonl").read_text() == rows_before.replace(str(moved), str(out))
    assert json.loads(step_times.read_text()) == step_times_before
    restored = {p["arm"]: p for p in sweep.plan_level(sweep.parse_args(argv), out, 4)}["mem"]
    assert sweep.run_finished(restored)  # restored for this plan; another plan of the run is not finished
    assert not sweep.run_finished({**restored, "tokens_per_bio": restored["tokens_per_bio"] + 1})

    def without_wall_time(text):  # the table's last line: this sitting's wall time
        return [line for line in text.splitlines() if not line.startswith("wall time of this sitting")]

    assert without_wall_time((out / "table.md").read_text()) == without_wall_time(table_before)
    again = results.load(str(tmp_path / "again.json"))
    assert again.rows == result.rows and f"runs trained at {commit}" in again.note
    assert results.load(str(sweep_report.attribute_results_path(tmp_path / "again.json"))).rows == list(where.values())
    # A changed plan (here --dense-factor) is not what was archived: that run is trained again, and
    # what its earlier restore wrote is moved aside (kept, no longer taken for the new run's rows).
    changed = [*argv, "--dense-factor", "2"]
    trained_again = []
    monkeypatch.setattr(sweep, "run_jobs", lambda jobs, *a: trained_again.extend(log.name for _, log in jobs) or [])
    sweep.main([*changed, "--archive", str(archive)])
    err = capsys.readouterr().err
    assert "dense-N4-s0: the archived run differs from the planned one (max_steps" in err and "moved aside" in err
    plan = {p["arm"]: p for p in sweep.plan_level(sweep.parse_args(changed), out, 4)}
    assert trained_again == ["dense-N4-s0.log"] and sweep.run_finished(plan["mem"])
    assert not (dense_dir / "sweep_recall.jsonl").exists() and (dense_dir / "sweep_recall.jsonl.superseded").is_file()
    assert not (dense_dir / "archived.json").exists() and not sweep.run_finished(plan["dense"])


def test_an_archived_command_names_the_sweep_directory_only_where_a_path_starts(tmp_path):
    from pkmlm.knowledge.archive import _portable

    out = tmp_path / "knowledge"
    command = [
        "-m", "pkmlm.cli.train", "experiment=knowledge/dense", f"data.files=[{out}/facts/b.jsonl,{out}/x]",
        f"hydra.run.dir={out}/runs/r", f"data.tokenizer={out}2/t.json", str(out),
    ]  # fmt: skip
    assert _portable(command, out) == [
        "-m", "pkmlm.cli.train", "experiment=knowledge/dense", "data.files=[{out}/facts/b.jsonl,{out}/x]",
        "hydra.run.dir={out}/runs/r", f"data.tokenizer={out}2/t.json", "{out}",
    ]  # fmt: skip


def test_run_caches_skip_torn_and_foreign_lines_and_append_after_them(tmp_path):
    from pkmlm.knowledge.archive import append_rows, cache_rows

    cache = tmp_path / "sweep_recall.jsonl"
    assert cache_rows(cache) == []
    cache.write_bytes(b'{"step": 1, "x": 1}\n\xff\xfe\n[1]\n{"step": "2"}\n{"step": 3, "x"')  # a torn last line
    assert cache_rows(cache) == [{"step": 1, "x": 1}]
    append_rows(cache, [{"step": 3, "x": 3}])
    assert cache_rows(cache) == [{"step": 1, "x": 1}, {"step": 3, "x": 3}]


def test_an_edited_archive_is_refused_with_its_line_before_anything_runs(tmp_path, monkeypatch):
    from pkmlm.knowledge import archive

    path = tmp_path / "archive.jsonl"
    run = {"kind": "run", "run": "dense-N4-s0", "arm": "dense", "people": 4, "seed": 0, "max_steps": 8}
    rows = [{"step": s, "tokens": 512 * s, "recall/bits": 1.5 * s} for s in (4, 8)]
    run |= {"steps_equal": 8, "tokens_per_bio": 50.5, "bios_share": 1.0, "train_args": [], "recall": rows}
    run |= {"usage": []}
    path.write_text(json.dumps(run) + "\n")
    assert list(archive.read(path).runs) == ["dense-N4-s0"]
    assert archive.read(tmp_path / "none.jsonl").runs == {}  # no file yet: an empty archive
    # A write keeps the file's runs, those another sitting added since this one read it too.
    mine = archive.read(path)
    path.write_text(json.dumps(run) + "\n" + json.dumps({**run, "run": "mem-N4-s0", "arm": "mem"}) + "\n")
    assert archive.write(mine, [], tmp_path) == 2
    assert sorted(archive.read(path).runs) == ["dense-N4-s0", "mem-N4-s0"]
    # ... under a lock: a writer that holds it (a sweep paused mid-write) is waited for, then named.
    import fcntl

    monkeypatch.setattr(archive, "LOCK_WAIT_S", 0.2)
    with open(path.with_name(path.name + ".lock"), "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match=r"archive.jsonl.lock for 0.2 s: let it finish"):
            archive.write(mine, [], tmp_path)
    assert archive.write(mine, [], tmp_path) == 2  # released: written
    for line, problem in [
        ("{not json", "line 2: not JSON"),
        (json.dumps({**run, "run": "mem-N4-s0", "max_steps": 12}), "has no recall row at its final step 12"),
        (json.dumps({**run, "people": "4"}), "without a valid 'people'"),
        (json.dumps(run), "run dense-N4-s0 appears twice"),
        (json.dumps({"kind": "table"}), "unknown kind 'table'"),
        (json.dumps({"kind": "step_times", "step_times": {}}), "a step_times line without its step_ms"),
        (json.dumps({**run, "run": "x", "recall": [{"step": 8, "tokens": 1}]}), "without a number 'recall/bits'"),
        (json.dumps({**run, "run": "x", "usage": 5}), "'usage' is not a list of usage rows"),
        (json.dumps({**run, "run": "x", "bios_share": None}), "without a valid 'bios_share'"),
    ]:
        path.write_text(json.dumps(run) + "\n" + line + "\n")
        with pytest.raises(SystemExit, match=problem) as e:
            sweep.main(["--people", "4", "--out", str(tmp_path / "sweep"), "--archive", str(path)])
        assert "git checkout" in str(e.value) and not (tmp_path / "sweep").exists()
    path.write_bytes(b"\xff\xfe not text\n")
    with pytest.raises(SystemExit, match="cannot be read"):
        sweep.main(["--people", "4", "--out", str(tmp_path / "sweep"), "--archive", str(path)])
    with pytest.raises(SystemExit, match="--archive is for a sweep that trains"):
        sweep.main(["--merge", str(tmp_path), "--out", str(tmp_path / "m"), "--archive", str(path)])


def test_reference_step_times_are_measured_once_and_a_broken_file_is_refused(tmp_path):
    from pkmlm.knowledge import step_time

    configs = {arm: sweep._compose([f"experiment=knowledge/{arm}"]) for arm in ("dense", "mem")}
    data = step_time.measure_step_times(tmp_path, configs, threads=1, warmup=1, repeats=2)
    assert sorted(data["step_ms"]) == ["dense", "mem"] and all(v > 0 for v in data["step_ms"].values())
    assert data["measured"][0]["threads"] == 1 and "load average" in data["measured"][0]["load"]
    before = (tmp_path / "step_times.json").read_text()
    assert step_time.measure_step_times(tmp_path, configs, threads=1, repeats=2) == data  # nothing re-measured
    assert (tmp_path / "step_times.json").read_text() == before
    (tmp_path / "step_times.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a step-times file: move it aside"):
        step_time.measure_step_times(tmp_path, configs, threads=1, repeats=2)
    assert (tmp_path / "step_times.json").read_text() == "{not json"  # left as it was


def test_an_arm_added_later_is_timed_against_an_arm_timed_before(tmp_path):
    from pkmlm.knowledge import step_time

    dense = sweep._compose(["experiment=knowledge/dense"])
    step_time.measure_step_times(tmp_path, {"dense": dense}, threads=1, warmup=1, repeats=2)
    engram = {"engram": sweep._compose(["experiment=knowledge/engram"])}
    with pytest.raises(ValueError, match="time the new arms against 'dense'"):
        step_time.measure_step_times(tmp_path, engram, threads=1, repeats=2)
    data = step_time.measure_step_times(tmp_path, engram, threads=1, warmup=1, repeats=2, anchor_config=dense)
    anchor = data["measured"][-1]["anchor"]
    assert data["measured"][-1]["arms"] == ["engram"] and anchor["arm"] == "dense"
    assert anchor["ms_before"] == data["step_ms"]["dense"]  # the anchor keeps its first time
    raw = anchor[
        "raw_ms"
    ]  # the new arm's time is its ratio to the anchor, measured in turns, x the anchor's earlier time
    assert data["step_ms"]["engram"] == pytest.approx(raw["engram"] / raw["dense"] * data["step_ms"]["dense"], rel=1e-3)


def test_bios_share_sets_the_biographies_share_of_the_mixtures_tokens(tmp_path):
    from pkmlm.knowledge.facts import write_corpus

    write_corpus(tmp_path / "facts", 30, seed=0, templates=2)
    bios, tokenizer = tmp_path / "facts" / "bios.jsonl", tmp_path / "tokenizer.json"
    sweep.shared_tokenizer(bios, tokenizer, ["experiment=knowledge/dense", f"paths.cache_dir={tmp_path}/cache"])
    overrides = [f"data.tokenizer={tokenizer}"]
    _, per_bio = sweep.steps_for(bios, 1.0, 2, ["experiment=knowledge/dense", *overrides])
    preset_share = sweep.bios_token_share(bios, overrides, per_bio, sample_docs=10)
    assert preset_share < 0.1  # the presets' 4:1 documents: mostly Wikipedia by tokens
    weight = sweep.bios_weight_for_share(0.5, overrides, per_bio, sample_docs=10)
    mixture = sweep.mixture_overrides(bios, overrides, weight)
    assert f"weight:{weight!r}" in mixture[1] and "weight:1.0" in mixture[1]  # only the bios weight moves
    assert sweep.bios_token_share(bios, [*overrides, *mixture], per_bio, sample_docs=10) == pytest.approx(0.5)
    with pytest.raises(SystemExit, match=r"--bios-share must be in \(0, 1\)"):
        sweep.main(["--bios-share", "1.5", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_the_memory_preset_is_the_sweeps_128_squared_arm():
    """knowledge/mem is sized from the capacity sweep (issue 21): the `mem` arm and the `mem128` arm
    are one model, and the mixture preset inherits it."""
    mem, mem128 = (
        sweep._compose(["experiment=knowledge/mem"]),
        sweep._compose(["experiment=knowledge/mem", *sweep.memory_overrides(128)]),
    )
    assert mem.model == mem128.model and mem.model.memory.n_keys == 128
    assert sweep._compose(["experiment=knowledge/mix_mem"]).model == mem.model


def test_a_mixtures_exposures_count_only_the_biographies_share_of_its_tokens(tmp_path):
    """Exposures = biographies read per person: a mixture run at bios share 0.5 reads its 160
    exposures in twice the tokens; rows cached before the share was counted are corrected."""
    run_dir = tmp_path / "runs" / "mix_mem128-N10-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    cached = [{"step": s, "tokens": 1000 * s, "exposures": 1000 * s / (100.0 * 10)} for s in (4, 8)]
    (run_dir / "sweep_recall.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cached))
    plan = {"arm": "mix_mem128", "people": 10, "seed": 0, "steps_equal": 8, "max_steps": 8,
            "tokens_per_bio": 100.0, "bios_share": 0.5, "run_dir": run_dir, "facts": tmp_path / "facts",
            "command": [], "overrides": []}  # fmt: skip
    rows = sweep.evaluate_cached(plan, templates=5)
    assert [r["exposures"] for r in rows] == [2.0, 4.0]  # 4,000 and 8,000 tokens, half of them biographies
    assert [r["exposures"] for r in sweep.evaluate_cached({**plan, "bios_share": 1.0}, templates=5)] == [4.0, 8.0]


def test_recall_json_holds_the_equal_exposure_point_that_pkmlm_compare_shows(tmp_path):
    """A dense run trains past its equal exposures (--dense-factor): pkmlm-compare reads
    `<run>/recall.json`, which holds the equal-exposure checkpoint's row, as the other arms' do (the
    last checkpoint's while the run has not reached it)."""
    run_dir = tmp_path / "runs" / "dense-N10-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    cached = [{"step": s, "tokens": 1000 * s, "recall/bits": float(s)} for s in (4, 8, 12)]
    (run_dir / "sweep_recall.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cached))
    plan = {"arm": "dense", "people": 10, "seed": 0, "steps_equal": 8, "max_steps": 12, "tokens_per_bio": 100.0,
            "run_dir": run_dir, "facts": tmp_path / "facts", "command": [], "overrides": []}  # fmt: skip
    sweep.evaluate_cached(plan, templates=5)
    assert json.loads((run_dir / "recall.json").read_text())["step"] == 8
    sweep.evaluate_cached({**plan, "steps_equal": 16, "max_steps": 32}, templates=5)
    assert json.loads((run_dir / "recall.json").read_text())["step"] == 12


def test_sparse_factor_runs_the_memory_past_equal_exposures(tmp_path):
    """--sparse-factor 2: the memory arms' max_steps double (dense_pm's do not); the table's 2x rows:
    tests/unit/test_sweep_report.py."""

    def plans(*extra):
        argv = ["--people", "4", "--seeds", "0", "--exposures", "1", "--arms", "dense,mem,dense_pm",
                "--dense-factor", "3", "--out", str(tmp_path / "sweep"), *extra]  # fmt: skip
        return {p["arm"]: p for p in sweep.plan_level(sweep.parse_args(argv), tmp_path / "sweep", 4)}

    one, two = plans(), plans("--sparse-factor", "2")
    assert two["mem"]["max_steps"] == 2 * one["mem"]["max_steps"] == 2 * one["mem"]["steps_equal"]
    assert two["dense"]["max_steps"] == one["dense"]["max_steps"] == 3 * one["dense"]["steps_equal"]
    assert two["dense_pm"]["max_steps"] == one["dense_pm"]["max_steps"] == one["dense_pm"]["steps_equal"]
    with pytest.raises(SystemExit, match="--sparse-factor must be >= 1"):
        sweep.main(["--sparse-factor", "0.5", "--out", str(tmp_path / "never")])


def test_the_remaining_time_counts_each_runs_steps_from_its_latest_complete_checkpoint(tmp_path):
    """Hours left per run = (max_steps - latest complete checkpoint) x the arm's reference step time;
    the sitting takes at least their sum over the jobs and at least the longest run; unknown (no
    estimate printed) when an arm has no reference time."""

    def plan(arm, max_steps, done=(), partial=()):
        run_dir = tmp_path / f"{arm}-{max_steps}"
        for step in (*done, *partial):
            (run_dir / "checkpoints" / f"step_{step:08d}.dcp").mkdir(parents=True)
        for step in done:
            (run_dir / "checkpoints" / f"step_{step:08d}.dcp" / ".metadata").write_text("")
        return {"arm": arm, "max_steps": max_steps, "run_dir": run_dir}

    todo = [plan("dense", 3000, done=(1000, 2000), partial=(2500,)), plan("mem", 1000)]
    assert sweep.steps_done(todo[0]["run_dir"]) == 2000 and sweep.steps_done(todo[1]["run_dir"]) == 0
    step_ms = {"dense": 360.0, "mem": 720.0}  # 1,000 steps x 0.36 s = 0.1 h; 1,000 x 0.72 s = 0.2 h
    assert sweep.remaining_hours(todo, step_ms) == pytest.approx([0.1, 0.2])
    eta = sweep._eta(todo, step_ms, jobs=2)
    assert "~0.3 job-hours" in eta and "~0.2 h or more at --jobs 2" in eta  # the longest run, not 0.3 / 2
    assert "~0.3 h or more at --jobs 1" in sweep._eta(todo, step_ms, jobs=1)
    assert sweep.remaining_hours(todo, {"dense": 360.0}) is None and sweep._eta(todo, {}, jobs=2) == ""


def test_the_sweep_says_when_the_dense_arm_stops_before_a_sparse_arms_time():
    """A sparse arm whose training time (reference step times) lies past the dense arm's
    --dense-factor gets a note naming the --dense-factor that reaches it: at its equal exposures, else
    at its longest point (--sparse-factor); dense_pm and arms within reach get none."""

    def plan(arm, factor=1.0):
        return {"arm": arm, "steps_equal": 100, "max_steps": int(100 * factor)}

    step_ms = {"dense": 100.0, "mem128": 167.5, "mem64": 146.0, "engram": 139.0, "dense_pm": 830.0}
    plans = [plan("dense", 2.0), plan("dense_pm"), plan("mem128", 2.0), plan("mem64"), plan("engram")]
    notes = sweep.equal_time_shortfalls(plans, step_ms, dense_factor=2.0)
    assert len(notes) == 1 and "mem128 at 2x its exposures trains 3.35x dense's" in notes[0]
    assert notes[0].endswith("--dense-factor 3.5 reaches it")
    notes = sweep.equal_time_shortfalls(plans, step_ms, dense_factor=1.5)
    assert [n.split()[2] for n in notes] == ["mem128"]  # 1.675x: past 1.5x at its equal exposures already
    assert "at its equal exposures" in notes[0] and notes[0].endswith("--dense-factor 1.75 reaches it")
    assert sweep.equal_time_shortfalls(plans, step_ms, dense_factor=3.5) == []
    assert sweep.equal_time_shortfalls([p for p in plans if p["arm"] != "dense"], step_ms, 1.0) == []  # no dense arm


def test_a_failed_run_stops_the_doubling_and_the_sweep_exits_non_zero(tmp_path, monkeypatch):
    """A training job that fails: no larger N is tried on a broken level (--until-saturated would
    otherwise double N, finding no 2x row), the report is still written, and the sweep exits with
    one line naming the failed run's log."""
    levels = []
    plan_level = sweep.plan_level
    monkeypatch.setattr(
        sweep, "plan_level", lambda args, out, people: levels.append(people) or plan_level(args, out, people)
    )
    argv = ["--people", "4", "--seeds", "0", "--exposures", "1", "--arms", "dense", "--dense-factor", "2",
            "--until-saturated", "--max-people", "8", "--step-time-repeats", "0",
            "--out", str(tmp_path / "sweep")]  # fmt: skip
    monkeypatch.setattr(sweep, "run_jobs", lambda jobs, parallel, threads: [log for _, log in jobs])
    with pytest.raises(SystemExit, match=r"sweep: 1 training run\(s\) failed \(logs: .*dense-N4-s0\.log\): fix"):
        sweep.main(argv)
    assert levels == [4] and (tmp_path / "sweep" / "table.md").is_file()
    monkeypatch.setattr(sweep, "run_jobs", lambda jobs, parallel, threads: [])  # nothing failed: N doubles
    levels.clear()
    sweep.main(argv)
    assert levels == [4, 8]


def test_run_jobs_runs_each_jobs_commands_in_turn_and_returns_the_logs_of_the_failed_ones(tmp_path):
    """A job is a list of commands run one after the other in one slot, the next only when the one
    before it succeeded; the logs of jobs with a failed command come back."""
    import sys

    def say(word, code=0):
        return [sys.executable, "-c", f"print({word!r}); raise SystemExit({code})"]

    jobs = [([say("a1"), say("a2")], tmp_path / "a.log"), ([say("b1", 3), say("b2")], tmp_path / "b.log")]
    (tmp_path / "a.log").write_text("an earlier sitting\n")
    assert sweep.run_jobs(jobs, parallel=2, threads=1) == [tmp_path / "b.log"]
    assert (tmp_path / "a.log").read_text().split() == ["an", "earlier", "sitting", "a1", "a2"]  # appended
    assert (tmp_path / "b.log").read_text().split() == ["b1"]  # b2 not run after b1 failed


def test_a_run_stopped_part_way_finishes_at_its_own_max_steps_before_a_changed_factor_extends_it(tmp_path):
    """Training resumes a run stopped part-way only under the max_steps it started with (the LR
    schedule), so a plan whose max_steps changed meanwhile (a --dense-factor raised while the run
    trained) first finishes the run at its recorded max_steps, then extends it; the commands differ
    only in train.max_steps."""
    run_dir = tmp_path / "dense-N800-s0"
    (run_dir / "checkpoints" / "step_00000050.dcp").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000050.dcp" / ".metadata").write_text("")
    (run_dir / "config.yaml").write_text("train:\n  max_steps: 100\n")
    command = ["python", "-m", "pkmlm.cli.train", "experiment=knowledge/dense", "train.max_steps=200", "seed=0"]
    plan = {"run_dir": run_dir, "max_steps": 200, "command": command}
    finish = [a.replace("=200", "=100") for a in command]
    assert sweep.recorded_max_steps(run_dir) == 100 and sweep.recorded_max_steps(tmp_path / "none") is None
    assert sweep.run_commands(plan) == [finish, command]
    assert sweep.run_commands({**plan, "max_steps": 80}) == [finish]  # the finished run passes step 80
    assert sweep.run_commands({**plan, "max_steps": 100}) == [command]
    (run_dir / "checkpoints" / "step_00000100.dcp" / ".metadata").parent.mkdir()
    (run_dir / "checkpoints" / "step_00000100.dcp" / ".metadata").write_text("")
    assert sweep.run_commands(plan) == [command]  # finished at 100: extended from there as it is
    assert sweep.run_commands({**plan, "run_dir": tmp_path / "new"}) == [command]


def test_merging_two_runs_of_one_arm_n_and_seed_is_refused(tmp_path):
    row = {"arm": "dense", "people": 50, "seed": 0, "step": 4, "steps_equal": 4}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run = {**row, "run_dir": str(tmp_path / name / "runs" / "dense-N50-s0")}
        (tmp_path / name / "results.jsonl").write_text(json.dumps(run) + "\n")
    with pytest.raises(SystemExit, match=r"--merge: two runs of arm dense, N=50, seed 0 \(.*a/runs.* and .*b/runs"):
        sweep.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()


def _weights(checkpoint):
    from pkmlm.run import load_run

    return {k: v.clone() for k, v in load_run(checkpoint).model.state_dict().items()}


@pytest.mark.slow
def test_decayed_branches_train_after_their_runs_resume_without_redoing_and_restore_from_the_archive(
    tmp_path, capsys, monkeypatch
):
    """--decay: each run's branch from its checkpoint at 1x (and the dense arm's wherever it meets the
    memory's branch in time) is trained in the run's job, scored, reported and archived; a second
    sitting trains and evaluates nothing; a directory lost to a reset is restored from the archive
    without training; a new branch point on a restored run trains the run again to it (the same
    weights: the run is deterministic) and its branch, the run's archived rows kept."""
    out, archive = tmp_path / "sweep", tmp_path / "archive.jsonl"
    argv = ["--people", "4", "--seeds", "0", "--exposures", "2", "--arms", "dense,mem", "--dense-factor", "2",
            "--jobs", "1", "--step-time-repeats", "2", "--decay", "1", "--out", str(out), "--archive", str(archive),
            "data.val_docs=2"]  # fmt: skip
    sweep.main(argv)
    err = capsys.readouterr().err
    # both runs, their branches from 1x and the dense arm's from where it meets mem's in time (if apart)
    assert re.search(r"N=4: 2 runs, 2 unfinished, [23] decayed branches unfinished \(~[0-9.]+ job-hours", err)
    plans = {p["arm"]: p for p in sweep.plan_level(sweep.parse_args(argv), out.resolve(), 4)}
    step_ms = json.loads((out / "step_times.json").read_text())["step_ms"]
    branches = decay.plan_branches(list(plans.values()), [1.0], step_ms)
    dense_points = [b["decay_from"] for b in branches[plans["dense"]["run_dir"]]]
    assert plans["dense"]["steps_equal"] in dense_points
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    decayed = [r for r in rows if r.get("decay_from") is not None]
    assert sorted((r["arm"], r["decay_from"]) for r in decayed) == sorted(
        [("dense", s) for s in dense_points] + [("mem", plans["mem"]["steps_equal"])]
    )
    for r in decayed:  # a whole training: the parent's steps and exposures to the branch point, then the branch's
        plan = plans[r["arm"]]
        parent = next(
            p for p in rows if p["arm"] == r["arm"] and p.get("decay_from") is None and p["step"] == r["decay_from"]
        )
        assert r["step"] == r["decay_from"] + decay.branch_steps(plan) and r["exposures"] > parent["exposures"]
        assert r["exposures"] == pytest.approx(parent["exposures"] * r["step"] / r["decay_from"], rel=0.02)
        assert r["ref_time_s"] == pytest.approx(r["step"] * step_ms[r["arm"]] / 1e3)
        meta = json.loads(
            (Path(r["run_dir"]) / "checkpoints" / f"step_{r['branch_step']:08d}.dcp" / "meta.json").read_text()
        )
        assert meta["init_from"].endswith(f"{plan['run_dir'].name}/checkpoints/step_{r['decay_from']:08d}.dcp")
    table = (out / "table.md").read_text()
    assert "| dense (decayed from 1x) |" in table and "| mem (decayed from 1x) |" in table
    # a dense branch planned for mem's time is the report's equal-time row (planned only where it is one)
    timed = "| dense (decayed, equal time to mem decayed from 1x) |" in table
    assert timed == bool(decay.time_matched_points(plans["dense"], [plans["mem"]], [1.0], step_ms))
    assert "N=4 dense, decayed branches:" not in table  # no 2x branch: no decayed saturation test
    archived = {json.loads(line).get("run") for line in archive.read_text().splitlines()}
    assert {Path(r["run_dir"]).name for r in decayed} <= archived
    # Sitting 2, the same command: nothing trained, nothing evaluated again
    snapshot = {name: _snapshot(out / "runs" / name) for name in os.listdir(out / "runs")}
    monkeypatch.setattr(sweep, "run_jobs", lambda jobs, *a: pytest.fail(f"trained again: {jobs}") if jobs else [])
    sweep.main(argv)
    assert {name: _snapshot(out / "runs" / name) for name in os.listdir(out / "runs")} == snapshot
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == rows
    # Sitting 3, the directory lost (a machine reset): runs and branches restored, nothing trained
    dense_at_1x = _weights(plans["dense"]["run_dir"] / "checkpoints" / f"step_{plans['dense']['steps_equal']:08d}.dcp")
    shutil.rmtree(out)
    monkeypatch.setattr(sweep, "measure_step_times", lambda *a, **k: pytest.fail("step times measured again"))
    sweep.main(argv)
    assert "decayed branches restored from" in capsys.readouterr().err
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == rows
    # Sitting 4, --decay 1,2: the dense run (restored: no checkpoints here) is trained again to 2x for its
    # new branch, from the same weights; its archived rows stay its rows; mem has no 2x point.
    monkeypatch.undo()
    sweep.main([*argv[: argv.index("--decay")], "--decay", "1,2", *argv[argv.index("--decay") + 2 :]])
    err = capsys.readouterr().err
    assert "dense-N4-s0: finished without its checkpoints here (restored from the archive): trained again" in err
    assert re.search(
        r"dense-N4-s0, trained again here: [0-9.,]+ bits at step \d+ against [0-9.,]+ archived: "
        "the archived run reproduced",
        err,
    )
    dense_dir = plans["dense"]["run_dir"]
    again = _weights(dense_dir / "checkpoints" / f"step_{plans['dense']['steps_equal']:08d}.dcp")
    assert again.keys() == dense_at_1x.keys() and all(torch.equal(again[k], dense_at_1x[k]) for k in again)
    new = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r for r in new if r.get("decay_from") is None] == [r for r in rows if r.get("decay_from") is None]
    twice = [r for r in new if r.get("decay_from") == 2 * plans["dense"]["steps_equal"]]
    assert [r["arm"] for r in twice] == ["dense"]
    assert "N=4 dense, decayed branches:" in (out / "table.md").read_text()


def test_max_runs_0_reports_every_n_whose_runs_are_done_though_their_decayed_branches_wait(tmp_path, monkeypatch):
    """--max-runs 0 trains nothing: a level whose runs are all finished but whose decayed branches
    are not goes on to the next N (the report covers it); a level with an unfinished run stops there."""
    levels = []
    plan_level = sweep.plan_level
    monkeypatch.setattr(
        sweep, "plan_level", lambda args, out, people: levels.append(people) or plan_level(args, out, people)
    )
    monkeypatch.setattr(sweep, "run_jobs", lambda jobs, *a: pytest.fail(f"trained: {jobs}") if jobs else [])
    monkeypatch.setattr(sweep, "evaluate_cached", lambda plan, templates: [])
    argv = ["--people", "4,8", "--seeds", "0", "--exposures", "1", "--arms", "dense", "--decay", "1",
            "--step-time-repeats", "0", "--max-runs", "0", "--out", str(tmp_path / "sweep")]  # fmt: skip
    monkeypatch.setattr(sweep, "run_finished", lambda plan: "decay_from" not in plan)  # runs done, branches not
    sweep.main(argv)
    assert levels == [8, 4]
    levels.clear()
    monkeypatch.setattr(sweep, "run_finished", lambda plan: False)
    sweep.main(argv)
    assert levels == [8]
