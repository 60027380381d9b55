"""The knowledge-capacity sweep: bits stored vs number of people N, dense vs memory, at equal
exposures and at equal training time.

`python -m pkmlm.knowledge.sweep --people 50,100,200 --seeds 0 --exposures 150 --out DIR`:

1. per seed and N, a pkmlm-facts corpus in `DIR/facts/N<N>-s<seed>/` (seeded by the run's seed),
   and one tokenizer per seed, trained as the presets say on the largest N's biographies
   (`DIR/facts/tokenizer-s<seed>.json`): the smaller corpora hold the first people of the largest
   (same value sets, same names), so every N is tokenized alike;
2. `train.max_steps` for E exposures per person: E x (tokens of one biography, end-of-text included,
   under the run's own tokenizer) x N / (batch x seq_len), rounded up to a multiple of 4;
3. per arm a `pkmlm-train experiment=knowledge/<arm>` run in `DIR/runs/<arm>-N<N>-s<seed>/`, with a
   checkpoint every quarter of those steps. The schedule is constant after warmup (the presets), so
   a checkpoint at step S is the S-step run: the dense arm runs `--dense-factor` times longer and
   its checkpoint nearest to the memory arm's training time is the equal-time point;
4. recall (`pkmlm.metrics.recall.evaluate_recall`) of every checkpoint, into `DIR/results.jsonl`
   (one row per checkpoint) and `<run>/recall.json` (the final one, which pkmlm-compare reads);
   `DIR/table.md`: per N, dense and memory at equal exposures and dense at equal time;
   `DIR/bits_vs_exposures.png`: every checkpoint's bits stored vs exposures and vs training time.

Jobs run `--jobs` at a time, each with `--threads` threads, under `nice`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pkmlm.config import config_dir

CHECKPOINTS_PER_RUN = 4  # checkpoints at each quarter of the equal-exposure steps


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from pkmlm.config import Config, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    typed: Config = OmegaConf.to_object(cfg)
    return typed


def shared_tokenizer(bios: Path, path: Path, overrides: list[str]) -> None:
    """The tokenizer the presets would train on `bios`, saved to `path` for every run of a seed."""
    from pkmlm.data.loader import resolve_data
    from pkmlm.data.tokenizer import load_or_train_tokenizer

    cfg = _compose(overrides + [f"data.files=[{bios}]"])
    tokenizer, _ = load_or_train_tokenizer(cfg.data, resolve_data(cfg.data), cfg.paths.cache_dir)
    tokenizer.save(str(path))


def steps_for(bios: Path, exposures: float, templates: int, overrides: list[str]) -> tuple[int, float]:
    """Optimizer steps for `exposures` biographies of every person, and tokens per biography, under
    the runs' tokenizer (`data.tokenizer` in `overrides`)."""
    from pkmlm.data.tokenizer import encode_documents, load_tokenizer

    cfg = _compose(overrides + [f"data.files=[{bios}]"])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    texts = [json.loads(line)["text"] for line in bios.read_text().splitlines()]
    tokens = sum(len(ids) + 1 for ids in encode_documents(tokenizer, texts))  # + the end-of-text
    per_bio = tokens / len(texts)
    people = len(texts) / templates
    steps = exposures * per_bio * people / (cfg.train.batch_size * cfg.data.seq_len)
    return CHECKPOINTS_PER_RUN * math.ceil(steps / CHECKPOINTS_PER_RUN), per_bio


def _train_command(
    arm: str, run_dir: Path, bios: Path, steps: int, max_steps: int, seed: int, extra: list[str]
) -> list[str]:
    every = steps // CHECKPOINTS_PER_RUN
    return [
        sys.executable,
        "-m",
        "pkmlm.cli.train",
        f"experiment=knowledge/{arm}",
        f"data.files=[{bios}]",
        f"train.max_steps={max_steps}",
        f"seed={seed}",
        f"checkpoint.interval={every}",
        "checkpoint.keep_last=1000",
        f"logging.interval={every}",
        "logging.progress=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _run_jobs(jobs: list[tuple[list[str], Path]], parallel: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w")  # noqa: SIM115 - closed when its job ends
            running.append(
                (subprocess.Popen(["nice", "-n", "5", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env), f, log)
            )
        time.sleep(1)
        for item in list(running):
            proc, f, log = item
            if proc.poll() is not None:
                f.close()
                running.remove(item)
                if proc.returncode:
                    print(f"job failed ({proc.returncode}): see {log}", file=sys.stderr, flush=True)


def _train_times(run_dir: Path) -> dict[int, float]:
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train_time_s" in row:
            times[row["step"]] = row["train_time_s"]
    return times


def evaluate_run(run_dir: Path, qa: Path, per_bio: float, people: int, templates: int) -> list[dict]:
    """Recall of every checkpoint of a run, oldest first; writes `<run>/recall.json` (the last)."""
    from pkmlm.checkpoint.store import list_checkpoints
    from pkmlm.metrics.recall import evaluate_recall
    from pkmlm.run import load_run

    times = _train_times(run_dir)
    rows = []
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        run = load_run(ckpt)
        metrics = evaluate_recall(run.model, run.tokenizer, qa)
        step_time = times.get(run.step, max((t for s, t in times.items() if s <= run.step), default=None))
        rows.append(
            {
                "step": run.step,
                "tokens": run.tokens,
                "exposures": run.tokens / (per_bio * people),
                "train_time_s": step_time,
                **metrics,
            }
        )
    if rows:
        (run_dir / "recall.json").write_text(json.dumps({"step": rows[-1]["step"], **rows[-1]}, indent=1) + "\n")
    return rows


def _fmt(row: dict | None, key: str, spec: str) -> str:
    return "n/a" if row is None or row.get(key) is None else format(row[key], spec)


def summary_table(results: list[dict]) -> str:
    """Per N and seed: dense and memory at equal exposures, dense at the memory's training time."""
    head = (
        "| N | bits available | arm | exposures | train time | exact match | bits stored | "
        "bits / param (total) | bits / param (non-embedding) |"
    )
    lines = [head, "|" + "---|" * 9]
    keys = sorted({(r["people"], r["seed"]) for r in results})
    for people, seed in keys:
        rows = [r for r in results if r["people"] == people and r["seed"] == seed]
        target = max((r["steps_equal"] for r in rows), default=0)
        mem = [r for r in rows if r["arm"] == "mem" and r["step"] == target]
        dense_eq = [r for r in rows if r["arm"] == "dense" and r["step"] == target]
        picks = [
            ("dense (equal exposures)", dense_eq[0] if dense_eq else None),
            ("memory (equal exposures)", mem[0] if mem else None),
        ]
        if mem and mem[0].get("train_time_s"):
            dense = [r for r in rows if r["arm"] == "dense" and r.get("train_time_s")]
            # Only when the dense run reached the memory's time (--dense-factor > 1): else its last
            # checkpoint is not an equal-time point, only the longest the dense arm ran.
            if dense and max(r["train_time_s"] for r in dense) >= mem[0]["train_time_s"]:
                picks.append(
                    ("dense (equal time)", min(dense, key=lambda r: abs(r["train_time_s"] - mem[0]["train_time_s"])))
                )
        for label, r in picks:
            non_emb = None
            if r is not None:
                n = r["recall/params/total"] - r["recall/params/embedding"]
                non_emb = {"v": r["recall/bits"] / n} if n > 0 else None
            lines.append(
                f"| {people} (seed {seed}) | {_fmt(r, 'recall/bits_available', ',.0f')} | {label} | "
                f"{_fmt(r, 'exposures', '.0f')} | {_fmt(r, 'train_time_s', '.0f')} s | "
                f"{_fmt(r, 'recall/exact_match', '.1%')} | {_fmt(r, 'recall/bits', ',.0f')} | "
                f"{_fmt(r, 'recall/bits_per_param/total', '.4f')} | {_fmt(non_emb, 'v', '.4f')} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pkmlm.knowledge.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--people", default="50,100,200", help="comma-separated N values")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (corpus and run)")
    p.add_argument("--exposures", type=float, default=150.0, help="biographies read per person (equal-exposure arms)")
    p.add_argument("--templates", type=int, default=5)
    p.add_argument("--arms", default="dense,mem", help="experiment=knowledge/<arm> presets")
    p.add_argument(
        "--dense-factor",
        type=float,
        default=1.5,
        help="the dense arm trains this many times the "
        "equal-exposure steps (its checkpoints give the equal-time point)",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="train nothing: the table and "
        "figures of the results.jsonl of these earlier sweep directories together, into --out",
    )
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    from pkmlm.knowledge.facts import write_corpus

    out = Path(args.out)
    if args.merge:
        results = [
            json.loads(line)
            for d in args.merge
            for line in (Path(d) / "results.jsonl").read_text().splitlines()
            if line.strip()
        ]
        out.mkdir(parents=True, exist_ok=True)
        print(report(results, out, f"merged from {', '.join(args.merge)}"), flush=True)
        return
    t0 = time.time()
    plans, jobs = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        tokenizer = out / "facts" / f"tokenizer-s{seed}.json"
        overrides = [*args.overrides, f"data.tokenizer={tokenizer.resolve()}"]
        for people in sorted((int(n) for n in args.people.split(",")), reverse=True):  # longest first
            facts = out / "facts" / f"N{people}-s{seed}"
            write_corpus(facts, people, seed, args.templates)
            if not tokenizer.is_file():  # the largest N comes first
                shared_tokenizer(facts / "bios.jsonl", tokenizer, ["experiment=knowledge/dense", *args.overrides])
            steps, per_bio = steps_for(
                facts / "bios.jsonl", args.exposures, args.templates, ["experiment=knowledge/dense", *overrides]
            )
            for arm in args.arms.split(","):
                run_dir = out / "runs" / f"{arm}-N{people}-s{seed}"
                factor = args.dense_factor if arm == "dense" else 1.0
                max_steps = CHECKPOINTS_PER_RUN * math.ceil(steps * factor / CHECKPOINTS_PER_RUN)
                jobs.append(
                    (
                        _train_command(arm, run_dir, facts / "bios.jsonl", steps, max_steps, seed, overrides),
                        out / "logs" / f"{run_dir.name}.log",
                    )
                )
                plans.append(
                    {
                        "arm": arm,
                        "people": people,
                        "seed": seed,
                        "steps_equal": steps,
                        "tokens_per_bio": per_bio,
                        "run_dir": run_dir,
                        "facts": facts,
                    }
                )
    print(f"{len(jobs)} runs planned", file=sys.stderr, flush=True)
    _run_jobs(jobs, args.jobs, args.threads)
    train_wall = time.time() - t0
    results: list[dict[str, Any]] = []
    for plan in plans:
        if not (plan["run_dir"] / "checkpoints").is_dir():
            continue
        for row in evaluate_run(
            plan["run_dir"], plan["facts"] / "qa.jsonl", plan["tokens_per_bio"], plan["people"], args.templates
        ):
            results.append({**{k: (str(v) if isinstance(v, Path) else v) for k, v in plan.items()}, **row})
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    print(report(results, out, f"wall time: training {train_wall:.0f} s, total {time.time() - t0:.0f} s"), flush=True)


def report(results: list[dict], out: Path, note: str) -> str:
    """`out/table.md` (the summary table and `note`), `out/bits_vs_exposures.png`,
    `out/bits_vs_people.png` and `out/bits_vs_parameters.png` for the sweep's rows; returns the table."""
    table = summary_table(results)
    if results:
        exposure_plot(results, out / "bits_vs_exposures.png")
        people_plot(results, out / "bits_vs_people.png", out / "bits_vs_parameters.png")
    (out / "table.md").write_text(table + f"\n{note}\n")
    return table


def exposure_plot(results: list[dict], path: Path) -> None:
    """Bits stored vs exposures (and vs training time), one line per arm and N: the checkpoints of
    each run (constant schedule: each checkpoint is the run of that length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pkmlm.experiments.report import save_bits_figure

    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["arm"], r["people"], r["seed"]) for r in results}):
        rows = sorted((r for r in results if (r["arm"], r["people"], r["seed"]) == key), key=lambda r: r["step"])
        label = f"{key[0]}, N={key[1]}, seed {key[2]}"
        ax_e.plot([r["exposures"] for r in rows], [r["recall/bits"] for r in rows], marker="o", label=label)
        ax_t.plot([r["train_time_s"] for r in rows], [r["recall/bits"] for r in rows], marker="o", label=label)
    for people in sorted({r["people"] for r in results}):
        available = next(r["recall/bits_available"] for r in results if r["people"] == people)
        for ax in (ax_e, ax_t):
            ax.axhline(available, linestyle="--", color="gray", linewidth=1)
    ax_e.set_xlabel("exposures per person (biographies read)")
    ax_t.set_xlabel("training time, s (shared CPU)")
    save_bits_figure(fig, (ax_e, ax_t), path)


def people_plot(results: list[dict], path: Path, parameters_path: Path) -> list[Path]:
    """Bits stored vs people N (`path`) and vs parameters (`parameters_path`) at equal exposures (each
    arm's checkpoint at the equal-exposure step of its N), as pkmlm-compare draws them; returns the
    files written, none with fewer than two points."""
    from pkmlm.experiments.report import knowledge_plot
    from pkmlm.experiments.runs import RunSummary

    runs = [
        RunSummary(
            path=Path(r["run_dir"]),
            label=f"{r['arm']} N={r['people']} seed {r['seed']}",
            config={},
            rows=[{"recall/people": r["people"], **r}],
            name=f"{r['arm']} (equal exposures)",
        )
        for r in results
        if r["step"] == r["steps_equal"]
    ]
    return knowledge_plot(runs, path, parameters_path)


if __name__ == "__main__":
    main()
