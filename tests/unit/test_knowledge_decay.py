"""Decayed branches of the knowledge sweep (pkmlm.knowledge.decay): where runs branch, the branch's
command, and its rows as whole trainings (the sweep that trains them: tests/e2e/test_knowledge_sweep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pkmlm.knowledge import decay
from pkmlm.knowledge import sweep_report as report


def plan(arm, steps_equal=400, factor=1.0, seed=0, people=800, out=Path("/sweep")):
    run_dir = out / "runs" / f"{arm}-N{people}-s{seed}"
    return {
        "arm": arm,
        "people": people,
        "seed": seed,
        "steps_equal": steps_equal,
        "max_steps": int(steps_equal * factor),
        "tokens_per_bio": 50.0,
        "bios_share": 1.0,
        "run_dir": run_dir,
        "facts": out / "facts",
        "command": ["python", "-m", "pkmlm.cli.train", "experiment=knowledge/dense", "train.max_steps=999",
                    "seed=0", "checkpoint.interval=100", "checkpoint.keep_last=1000", "logging.interval=100",
                    f"hydra.run.dir={run_dir}"],
    }  # fmt: skip


def test_runs_branch_at_the_listed_multiples_they_reach_on_their_checkpoints():
    assert decay.listed_points(plan("dense", factor=3.5), [1, 2]) == [400, 800]
    assert decay.listed_points(plan("dense_pm", factor=1), [1, 2]) == [400]  # not run to 2x: no 2x branch
    assert decay.listed_points(plan("mem128", factor=2), [0.75, 1.5]) == [300, 600]  # quarters: checkpoints
    assert decay.branch_steps(plan("dense")) == 100  # a quarter of the equal-exposure steps (40 of 160 exposures)
    assert decay.parse_factors("1, 2") == [1.0, 2.0] and decay.parse_factors("") == []
    for bad in ("1.1", "0", "-1", "x", "inf"):
        with pytest.raises(SystemExit, match=f"--decay '{bad}'"):
            decay.parse_factors(bad)


def test_the_dense_arm_also_branches_where_its_branch_ends_at_a_sparse_branchs_time():
    # mem128's step takes 1.6x dense's: its branch from 1x (400 + 100 steps) ends at 800 ms-steps of
    # dense time = 700 dense steps + its 100-step branch: dense branches from 700 (a checkpoint) too.
    step_ms = {"dense": 100.0, "mem128": 160.0}
    dense, mem = plan("dense", factor=3.5), plan("mem128", factor=2)
    assert decay.time_matched_points(dense, [mem], [1], step_ms) == [700]
    # From 2x (800 + 100 steps: 1,440 dense steps' time), 1,340 is not a checkpoint: the nearest, 1,300
    assert decay.time_matched_points(dense, [mem], [1, 2], step_ms) == [700, 1300]
    # A dense run too short to meet that time has no equal-time branch (its nearest ending before it
    # would be no equal-time row: sweep_report.equal_time_pick); nor an arm not yet timed
    assert decay.time_matched_points(plan("dense", factor=1), [mem], [2], step_ms) == []
    assert decay.time_matched_points(plan("dense", factor=3.25), [mem], [1, 2], step_ms) == [
        700
    ]  # 1,300 ends at 140 s of 144
    assert decay.time_matched_points(dense, [mem], [1], {"dense": 100.0}) == []
    branches = decay.plan_branches([dense, mem, plan("mem128", seed=1, factor=2)], [1, 2], step_ms)
    assert [b["decay_from"] for b in branches[dense["run_dir"]]] == [400, 700, 800, 1300]
    assert [b["decay_listed"] for b in branches[dense["run_dir"]]] == [True, False, True, False]
    assert [b["decay_from"] for b in branches[mem["run_dir"]]] == [400, 800]


def test_a_branch_is_its_parents_run_from_a_checkpoint_with_the_lr_decayed_to_zero():
    parent = plan("dense", factor=3.5)
    branch = decay.branch_plan(parent, 800, listed=True)
    assert branch["run_dir"] == Path("/sweep/runs/dense-N800-s0-decay800-100") and branch["parent"] == parent["run_dir"]
    assert branch["max_steps"] == 100 and branch["steps_equal"] == 400 and branch["decay_from"] == 800
    command = branch["command"]
    assert command[:4] == parent["command"][:4] and "seed=0" in command and "checkpoint.keep_last=1000" in command
    assert f"init_from={parent['run_dir']}/checkpoints/step_00000800.dcp" in command
    for arg in ("optim.schedule=cosine", "optim.min_lr_ratio=0.0", "optim.warmup_steps=20", "train.max_steps=100",
                "checkpoint.interval=100", "logging.interval=100", f"hydra.run.dir={branch['run_dir']}"):  # fmt: skip
        assert command.count(arg) == 1, arg
    assert not [a for a in command if a in ("train.max_steps=999", f"hydra.run.dir={parent['run_dir']}")]
    tiny = decay.branch_plan(plan("dense", steps_equal=4), 4, listed=True)  # a test-sized run: warmup < its 1 step
    assert "optim.warmup_steps=0" in tiny["command"] and tiny["max_steps"] == 1


def test_a_branch_row_counts_the_parents_training_up_to_its_branch_point():
    parent_rows = [
        {"step": s, "exposures": s / 10, "tokens": 1000 * s, "train_time_s": s / 2, "recall/bits": float(s)}
        for s in (100, 200, 300, 400)
    ]
    branch = {"step": 100, "tokens": 100000, "exposures": 10.0, "train_time_s": 60.0, "decay_from": 400,
              "run_dir": Path("/b"), "parent": Path("/p"), "recall/bits": 500.0}  # fmt: skip
    (row,) = decay.total_rows([branch], parent_rows)
    assert (row["step"], row["branch_step"], row["exposures"], row["train_time_s"]) == (500, 100, 50.0, 260.0)
    assert row["tokens"] == 500_000
    assert row["run_dir"] == "/b" and row["parent"] == "/p"
    assert decay.total_rows([{**branch, "decay_from": 350}], parent_rows) == []  # no parent row there: left out


def test_a_parent_without_a_branchs_checkpoint_is_trained_again_to_the_last_one_missing(tmp_path):
    parent = plan("dense", factor=3.5, out=tmp_path)
    branches = [decay.branch_plan(parent, s, listed=True) for s in (400, 800)]
    assert decay.retrain_to(parent, branches) == 800  # restored from an archive: no checkpoints at all
    for step in (400, 800):
        done = Path(parent["run_dir"]) / "checkpoints" / f"step_{step:08d}.dcp"
        done.mkdir(parents=True)
        (done / ".metadata").write_text("")
    assert decay.retrain_to(parent, branches) is None


def branch_row(arm, seed, decay_from, bits, ref, listed=True):
    return {"arm": arm, "people": 800, "seed": seed, "steps_equal": 400, "decay_from": decay_from,
            "decay_listed": listed, "step": decay_from + 100, "ref_time_s": ref, "recall/bits": bits,
            "exposures": (decay_from + 100) / 2.5}  # fmt: skip


def run_row(arm, seed, step, bits, ref):
    return {"arm": arm, "people": 800, "seed": seed, "steps_equal": 400, "step": step, "ref_time_s": ref,
            "recall/bits": bits, "exposures": step / 2.5}  # fmt: skip


def test_the_report_gives_decayed_points_beside_the_constant_lr_ones_and_tests_saturation_on_them(tmp_path):
    rows = []
    for seed in (0, 1):
        rows += [run_row("dense", seed, s, 100.0 * s / 400, 0.1 * s) for s in (100, 200, 300, 400, 500, 600, 700, 800)]
        rows += [
            run_row("mem128", seed, s, 150.0 * s / 400, 0.16 * s) for s in (100, 200, 300, 400, 500, 600, 700, 800)
        ]
        # decayed: dense 200 -> 204 bits from 1x to 2x (saturated by the 5% rule), mem128 220 -> 260
        rows += [branch_row("dense", seed, 400, 200.0, 50.0), branch_row("dense", seed, 800, 204.0 + seed, 90.0)]
        rows += [branch_row("dense", seed, 700, 203.0, 80.0, listed=False)]  # mem128's branch from 1x: 80 s
        rows += [branch_row("mem128", seed, 400, 220.0, 80.0), branch_row("mem128", seed, 800, 260.0, 144.0)]
    points = report.points(rows)
    labels = {label: [(r["seed"], r["recall/bits"]) for r in picked] for (_, label), picked in points.items()}
    assert labels["dense (decayed from 1x)"] == [(0, 200.0), (1, 200.0)]
    assert labels["dense (decayed, equal time to mem128 decayed from 1x)"] == [(0, 203.0), (1, 203.0)]
    assert "dense (decayed, equal time to mem128 decayed from 2x)" not in labels  # dense's branches end before
    assert labels["mem128 (decayed from 2x)"] == [(0, 260.0), (1, 260.0)]
    assert not [label for label in labels if "0.75x" in label or "1.75x" in label]  # time-matched only as such
    # the constant-LR points read the runs' own rows only: a branch at step 500 is not dense's 500
    assert labels["dense (equal exposures)"] == [(0, 100.0), (1, 100.0)]
    assert labels["dense (2x exposures)"] == [(0, 200.0), (1, 200.0)]
    assert report.gain_at_2x(rows, 800, "dense") == (100.0, 200.0, 2)
    assert report.gain_at_2x(rows, 800, "dense", decayed=True) == (200.0, 204.5, 2)
    lines = report.saturation_lines(rows)
    assert (
        "N=800 dense, decayed branches: 200 -> 204 bits from 1x to 2x the exposures (+2.2%, 2 seeds): saturated"
        in lines
    )
    assert (
        "N=800 dense: 100 -> 200 bits from 1x to 2x the exposures (+100.0%, 2 seeds): not saturated (the test: < +5%)"
        in lines
    )
    ratios = report.decayed_payoff_ratios(rows)
    assert ratios["equal exposures, decayed from 1x"]["mem128"][800] == pytest.approx([1.1, 1.1])
    assert ratios["equal time, decayed from 1x"]["mem128"][800] == pytest.approx([220 / 203] * 2)
    assert ratios["equal exposures, decayed from 2x"]["mem128"][800] == pytest.approx([260 / 204, 260 / 205])
    assert list(ratios)[:2] == ["equal exposures, decayed from 1x", "equal time, decayed from 1x"]
    assert report.payoff_plot(rows, tmp_path / "payoff.png", decayed=True) and (tmp_path / "payoff.png").stat().st_size
    assert not report.payoff_plot(report.constant_rows(rows), tmp_path / "none.png", decayed=True)


def test_the_constant_lr_tests_never_read_a_branch_row():
    # dense to 1,600 steps (4x) at a constant LR; a branch from 700 ends at 800 = half the last step:
    # the far-end test must take the run's own checkpoint there, not the branch
    rows = [{**run_row("dense", 0, s, float(s), 0.1 * s), "max_steps": 1600} for s in (400, 800, 1600)]
    rows += [{**branch_row("dense", 0, 700, 999.0, 80.0), "max_steps": 100}]
    assert report.gain_over_last_doubling(rows, 800, "dense") == (800.0, 1600.0, 640.0, 1)
    assert report.usage_rows([{**r, "run_dir": "/r", "facts": "/f", "arm": "mem"} for r in rows]) == [
        {**rows[0], "run_dir": "/r", "facts": "/f", "arm": "mem"}
    ]
    mem_rows = [{**r, "arm": "mem"} for r in rows]  # a branch from 300 ends at the equal-exposure step
    mem_rows[-1] = {**mem_rows[-1], "decay_from": 300, "step": 400}
    assert [r["step"] for r in report.usage_rows([{**r, "run_dir": "/r", "facts": "/f"} for r in mem_rows])] == [400]


def test_a_run_trained_again_here_names_both_commits(tmp_path):
    import json

    run_dir = tmp_path / "dense-N800-s0"
    (run_dir / "checkpoints" / "step_00000400.dcp").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000400.dcp" / "meta.json").write_text(
        json.dumps({"code_version": {"commit": "bbbbbbb111", "dirty": False}})
    )
    (run_dir / "archived.json").write_text(json.dumps({"code_version": {"commit": "aaaaaaa000", "dirty": False}}))
    assert report.run_commits([{"run_dir": str(run_dir)}]) == "aaaaaaa, bbbbbbb"
    (run_dir / "archived.json").unlink()
    assert report.run_commits([{"run_dir": str(run_dir)}]) == "bbbbbbb"


def test_a_restored_runs_job_trains_it_again_to_its_last_branch_point_then_the_branches(tmp_path):
    from pkmlm.knowledge import sweep

    parent = plan("dense", factor=3.5, out=tmp_path)
    Path(parent["run_dir"]).mkdir(parents=True)
    (Path(parent["run_dir"]) / "config.yaml").write_text("train:\n  max_steps: 1400\n")  # an attempt, no checkpoint
    (Path(parent["run_dir"]) / "archived.json").write_text("{}")
    branches = {parent["run_dir"]: [decay.branch_plan(parent, s, listed=True) for s in (400, 800)]}
    sweep_finished = sweep.run_finished
    try:
        sweep.run_finished = lambda p: p is parent  # restored; its branches not trained
        commands, parts, note = sweep._job(parent, branches)
    finally:
        sweep.run_finished = sweep_finished
    assert commands[0] == sweep.with_max_steps(parent["command"], 800)  # to 800, not the recorded 1,400
    assert commands[1:] == [b["command"] for b in branches[parent["run_dir"]]]
    assert [end for _, end in parts] == [800, 100, 100] and "trained again to step 800" in note
