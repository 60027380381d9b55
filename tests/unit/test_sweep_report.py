"""The knowledge sweep's report (pkmlm.knowledge.sweep_report): the points compared, the tables,
where the bits go, the results files and the figures, on hand-made rows (the sweep that makes real
ones: tests/e2e/test_knowledge_sweep.py)."""

from __future__ import annotations

import json

from pkmlm.knowledge import sweep_report as report


def test_equal_time_uses_the_reference_step_times_not_the_loaded_wall_clock():
    def row(arm, step, wall, ref=None):
        r = {"arm": arm, "step": step, "train_time_s": wall}
        return r if ref is None else {**r, "ref_time_s": ref}

    # A dense run trained on a busy machine: its wall clock says step 40 matches the memory's time,
    # its reference step time (half the memory's) says step 80.
    mem = row("mem", 40, wall=100.0, ref=40.0)
    dense = [row("dense", s, wall=2.5 * s, ref=0.5 * s) for s in (20, 40, 60, 80, 100)]
    assert report.equal_time_pick(mem, dense)["step"] == 80
    # Without reference times (a sweep measured before step_times.json existed): the wall clock.
    strip = [{k: v for k, v in r.items() if k != "ref_time_s"} for r in [mem, *dense]]
    assert report.equal_time_pick(strip[0], strip[1:])["step"] == 40
    # A dense run that stopped before the memory's time has no equal-time point.
    assert report.equal_time_pick(mem, dense[:3]) is None
    # Nor one whose nearest checkpoint is far from it: dense_pm's first checkpoint, 24% past the memory's
    pm = [row("dense_pm", s, wall=1.0, ref=742.0 * s / 40) for s in (40, 80)]
    assert report.equal_time_pick(row("mem128", 160, wall=1.0, ref=598.0), pm) is None
    assert report.equal_time_pick(row("mem128", 160, wall=1.0, ref=700.0), pm)["step"] == 40  # 6% off: kept


def test_every_sparse_arm_meets_the_dense_arms_of_its_own_corpus_at_equal_time():
    def row(arm, step, ref):
        return {"arm": arm, "people": 400, "seed": 0, "step": step, "steps_equal": 40, "ref_time_s": ref}

    rows = [row("engram", 40, 60.0), row("mix_mem128", 40, 80.0)]
    for dense_arm in ("dense", "mix_dense"):
        rows += [row(dense_arm, s, 1.0 * s) for s in (20, 40, 60, 80)]
    labels = {label: [r["step"] for r in picked] for (_, label), picked in report.points(rows).items()}
    # Engram (no "mem" in its name) is a sparse arm too; the mixture's memory meets the mixture's dense
    assert labels["dense (equal time to engram)"] == [60]
    assert labels["mix_dense (equal time to mix_mem128)"] == [80]
    assert "dense (equal time to mix_mem128)" not in labels and "mix_dense (equal time to engram)" not in labels


def test_the_exposure_plot_gives_an_arm_one_colour_and_a_seed_one_line_style(tmp_path):
    """12 arms x 3 seeds (past tab10's 10 colours): every arm its own colour, the same in each seed;
    every seed its own line style; each arm named once in the legend; the figure is written."""
    arms = [f"arm{i}" for i in range(12)]
    results = [
        {"arm": a, "people": 400, "seed": s, "step": step, "exposures": step, "recall/bits": float(step),
         "recall/bits_available": 100.0, "train_time_s": float(step)}
        for a in arms for s in (0, 1, 2) for step in (1, 2)
    ]  # fmt: skip
    styles = report.line_styles(results)
    colours = {a: {styles[(a, 400, s)]["color"] for s in (0, 1, 2)} for a in arms}
    assert all(len(c) == 1 for c in colours.values()) and len({c.pop() for c in colours.values()}) == 12
    for a in arms:
        assert len({(styles[(a, 400, s)]["linestyle"], styles[(a, 400, s)]["marker"]) for s in (0, 1, 2)}) == 3
        assert [styles[(a, 400, s)]["label"] for s in (0, 1, 2)] == [f"{a}, N=400", None, None]
    report.exposure_plot(results, tmp_path / "bits.png")
    assert (tmp_path / "bits.png").stat().st_size > 0


def test_where_the_bits_go_gives_each_attributes_share_and_the_memorys_usage(tmp_path):
    """Per attribute: bits stored over N x the attribute's bits per person (the corpus's meta.json);
    product-key memory arms at equal exposures: the usage measured on the questions, read from the
    run's cache line of that step and questions file (the measurement itself, and that it is not
    repeated: the resume test); n/a where a corpus or a checkpoint is missing. Written beside the
    sweep's results file."""
    from pkmlm.knowledge.facts import ATTRIBUTES

    facts = tmp_path / "facts"
    facts.mkdir()
    per_person = {a: float(i + 1) for i, a in enumerate(ATTRIBUTES)}  # 1, 2, ..., 6 bits
    (facts / "meta.json").write_text(json.dumps({"bits_per_attribute": per_person}))
    mem_dir = tmp_path / "mem"
    mem_dir.mkdir()
    qa = str(facts / "qa.jsonl")
    cached = [
        {"step": 10, "qa": qa, "usage": {"usage": 0.9, "kl_count": 9.0, "top90": 9.0}},  # another checkpoint's
        {"step": 20, "qa": "other/qa.jsonl", "usage": {"usage": 0.1, "kl_count": 9.0, "top90": 9.0}},  # other questions
        {"step": 20, "usage": {"usage": 0.2}},  # an older line without its questions file: not trusted
        {"step": 20, "qa": qa, "usage": {"usage": 0.6, "kl_count": 1.5, "top90": 1234.0}},
    ]
    lines = [json.dumps(row) for row in cached]
    (mem_dir / "sweep_usage.jsonl").write_text("\n".join([lines[0], '{"step": 20, "us', *lines[1:]]) + "\n")

    def row(arm, seed, share, run_dir, facts_dir=facts):
        by_attribute = {f"recall/by_attribute/{a}/bits": share * 10 * per_person[a] for a in ATTRIBUTES}
        return {"arm": arm, "people": 10, "seed": seed, "step": 20, "steps_equal": 20, "facts": str(facts_dir),
                "run_dir": str(run_dir), "recall/bits": 1.0, "recall/bits_available": 210.0, "exposures": 1.0,
                "recall/exact_match": 0.5, "recall/bits_per_param/total": 0.1, "recall/params/total": 100,
                "recall/params/embedding": 10, **by_attribute}  # fmt: skip

    results = [
        row("mem128", 0, 0.5, mem_dir),
        row("mem128", 1, 0.7, tmp_path / "gone"),  # no checkpoint here: no usage from it, nothing written
        row("dense", 0, 0.25, tmp_path / "dense", facts_dir=tmp_path / "nowhere"),  # corpus not here
    ]
    table = {r[1]: r for r in report.attribute_rows(results)}
    mem = table["mem128 (equal exposures)"]
    assert mem[:3] == [10, "mem128 (equal exposures)", 2]
    assert mem[3 : 3 + len(ATTRIBUTES)] == ["60% (50%-70%)"] * len(ATTRIBUTES)
    assert mem[-3:] == ["60.0%", "1.50", "1,234"]  # step 20's for these questions, one seed
    assert table["dense (equal exposures)"][3:] == ["n/a"] * (len(ATTRIBUTES) + 3)
    assert not (tmp_path / "gone").exists() and len((mem_dir / "sweep_usage.jsonl").read_text().splitlines()) == 5
    assert "| 60% (50%-70%) |" in report.attribute_table(results)

    out = tmp_path / "docs" / "knowledge.json"
    report.write_results(results, out, "python -m pkmlm.knowledge.sweep ...", 1, "mean over seeds (min-max)")
    written = json.loads(report.attribute_results_path(out).read_text())
    assert report.attribute_results_path(out).name == "knowledge_attributes.json"
    assert written["columns"] == list(report.ATTRIBUTE_COLUMNS) and len(written["rows"]) == 2
    assert json.loads(out.read_text())["columns"] == list(report.MEAN_COLUMNS)


def test_the_table_shows_every_arms_2x_point_and_dense_at_the_memorys_2x_time():
    """An '(2x exposures)' row for each arm with a checkpoint at twice its equal-exposure steps
    (`--sparse-factor 2` runs the memory that far), and dense at the memory's 2x time where dense
    ran that long."""

    def row(arm, step, bits):
        return {"arm": arm, "people": 4, "seed": 0, "step": step, "steps_equal": 8, "recall/bits": bits}

    rows = [row("dense", 8, 10.0), row("dense", 16, 11.0), row("mem", 8, 12.0), row("mem", 12, 13.0)]
    labels = {label: [r["recall/bits"] for r in picked] for (_, label), picked in report.points(rows).items()}
    assert labels["dense (2x exposures)"] == [11.0] and "mem (2x exposures)" not in labels  # mem stopped at 1.5x
    rows.append(row("mem", 16, 14.0))
    assert report.points(rows)[(4, "mem (2x exposures)")][0]["recall/bits"] == 14.0
    # dense at the memory's 2x time, where dense ran that long: its checkpoint nearest that time
    timed = [{**r, "ref_time_s": r["step"] * (2.0 if r["arm"] == "mem" else 1.0)} for r in rows]
    timed += [{**row("dense", s, 10.0 + s), "ref_time_s": float(s)} for s in (24, 32)]
    points = report.points(timed)
    assert points[(4, "dense (equal time to mem)")][0]["step"] == 16  # the memory's 16 s at 1x
    assert points[(4, "dense (equal time to mem at 2x)")][0]["step"] == 32  # its 32 s at 2x
    assert (4, "dense (equal time to mem at 2x)") not in report.points([r for r in timed if r["step"] < 32])


def test_twice_the_exposures_gives_each_arms_gain_and_the_dense_arms_saturation_test():
    """Per N and arm with both points: mean bits at 1x and 2x over the seeds that have both (a seed
    still training counts in neither); the saturation verdict for dense only (< +5%)."""

    def row(arm, seed, step, bits, people=400):
        return {"arm": arm, "people": people, "seed": seed, "step": step, "steps_equal": 8, "recall/bits": bits}

    results = [row("dense", 0, 8, 100.0), row("dense", 0, 16, 110.0), row("dense", 1, 8, 200.0),  # seed 1: no 2x
               row("mem128", 0, 8, 120.0), row("mem128", 0, 16, 126.0), row("mem128", 0, 12, 999.0),
               row("dense", 0, 8, 100.0, people=800), row("dense", 0, 16, 104.0, people=800),
               row("engram", 0, 8, 50.0)]  # fmt: skip
    assert report.gain_at_2x(results, 400, "dense") == (100.0, 110.0, 1)
    assert report.gain_at_2x(results, 400, "engram") is None
    assert report.saturation_lines(results) == [
        "N=400 dense: 100 -> 110 bits from 1x to 2x the exposures (+10.0%, 1 seed): not saturated (the test: < +5%)",
        "N=400 mem128: 120 -> 126 bits from 1x to 2x the exposures (+5.0%, 1 seed)",
        "N=800 dense: 100 -> 104 bits from 1x to 2x the exposures (+4.0%, 1 seed): saturated",
    ]


def test_the_dense_arms_saturation_is_tested_again_on_the_far_end_of_its_curve():
    """Dense run past 2x (`--dense-factor 3.5`): its bits at the last step against half of it, over
    the finished seeds (a seed still training, whose last checkpoint is not its max_steps, counts
    in neither); no such line where half the last step is the equal-exposure step (that is the
    1x -> 2x line) or for the sparse arms."""

    def row(arm, seed, step, bits, max_steps=28, people=800):
        return {"arm": arm, "people": people, "seed": seed, "step": step, "steps_equal": 8, "max_steps": max_steps,
                "exposures": 20.0 * step, "recall/bits": bits}  # fmt: skip

    results = [row("dense", 0, 8, 50.0), row("dense", 0, 16, 80.0), row("dense", 0, 14, 90.0),
               row("dense", 0, 28, 93.0), row("dense", 1, 14, 70.0), row("dense", 1, 28, 77.0),
               row("dense", 2, 14, 10.0), row("dense", 2, 20, 999.0),  # seed 2: still training
               row("mem128", 0, 8, 60.0, max_steps=16), row("mem128", 0, 16, 70.0, max_steps=16),
               row("dense", 0, 8, 10.0, max_steps=16, people=400),
               row("dense", 0, 16, 11.0, max_steps=16, people=400)]  # fmt: skip
    assert report.gain_over_last_doubling(results, 800, "dense") == (80.0, 85.0, 560.0, 2)
    assert report.gain_over_last_doubling(results, 400, "dense") is None  # half of 16 is the 1x step
    assert report.gain_over_last_doubling(results, 800, "mem128") is None
    assert report.saturation_lines(results) == [
        "N=400 dense: 10 -> 11 bits from 1x to 2x the exposures (+10.0%, 1 seed): not saturated (the test: < +5%)",
        "N=800 dense: 50 -> 80 bits from 1x to 2x the exposures (+60.0%, 1 seed): not saturated (the test: < +5%)",
        "N=800 dense, its curve's last doubling: 80 -> 85 bits from 280 to 560 exposures (+6.2%, 2 seeds): "
        "not saturated (the test: < +5%)",
        "N=800 mem128: 60 -> 70 bits from 1x to 2x the exposures (+16.7%, 1 seed)",
    ]
    results += [row("dense", 3, 14, 76.0), row("dense", 3, 28, 76.5)]  # a third finished seed: 78.7 -> 82.2
    assert report.saturation_lines(results)[2].endswith("(+4.4%, 3 seeds): saturated")
    # a rounded max_steps: the checkpoint within 1% of half the last step stands for it
    rounded = [row("dense", 0, 1400, 100.0, max_steps=2802), row("dense", 0, 2802, 104.0, max_steps=2802),
               row("dense", 1, 1380, 100.0, max_steps=2802), row("dense", 1, 2802, 104.0, max_steps=2802)]  # fmt: skip
    assert report.gain_over_last_doubling(rounded, 800, "dense")[1:] == (104.0, 56040.0, 1)  # 1,380 is 1.5% off


def test_the_payoff_figure_gives_each_arms_bits_over_dense_at_equal_exposures_and_at_equal_time(tmp_path):
    """Per seed: the arm's equal-exposure bits over the dense arm's equal-exposure bits, and (sparse
    arms) over the dense checkpoint at the arm's training time; the mixture's arms against mix_dense."""

    def row(arm, seed, step, bits, ref):
        return {"arm": arm, "people": 400, "seed": seed, "step": step, "steps_equal": 8, "recall/bits": bits,
                "ref_time_s": ref}  # fmt: skip

    results = []
    for seed, (mem, dense_1x, dense_2x) in enumerate([(120.0, 100.0, 150.0), (132.0, 110.0, 165.0)]):
        results += [row("mem128", seed, 8, mem, 16.0), row("dense_pm", seed, 8, 130.0, 80.0),
                    row("dense", seed, 8, dense_1x, 8.0), row("dense", seed, 16, dense_2x, 16.0),
                    row("mix_mem128", seed, 8, 60.0, 16.0), row("mix_dense", seed, 8, 50.0, 8.0),
                    row("mix_dense", seed, 16, 75.0, 16.0)]  # fmt: skip
    ratios = report.payoff_ratios(results)
    assert ratios["equal exposures"]["mem128"][400] == [1.2, 1.2]
    assert ratios["equal exposures"]["dense_pm"][400] == [1.3, 130.0 / 110.0]
    assert ratios["equal exposures"]["mix_mem128"][400] == [1.2, 1.2]  # against mix_dense, not dense
    assert ratios["equal time"]["mem128"][400] == [0.8, 0.8]  # dense at 2x: the memory's time
    assert "dense_pm" not in ratios["equal time"] and "dense" not in ratios["equal exposures"]
    assert ratios[report.TWICE] == {}  # no memory checkpoint at 2x yet
    # mem128 run to 2x (its time 32 s) and dense run that long: the third panel, per seed
    results += [row("mem128", 0, 16, 180.0, 32.0), row("dense", 0, 32, 160.0, 32.0),
                row("mem128", 1, 16, 198.0, 32.0)]  # seed 1's dense did not run that long  # fmt: skip
    assert report.payoff_ratios(results)[report.TWICE] == {"mem128": {400: [180.0 / 160.0]}}
    assert report.payoff_plot(results, tmp_path / "payoff.png") and (tmp_path / "payoff.png").stat().st_size > 0
    assert not report.payoff_plot(results[2:3], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
