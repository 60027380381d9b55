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
   its checkpoint nearest to the memory arm's training time is the equal-time point. Training time
   here is the reference time (steps x the arm's step time, all arms timed in turns once per sweep
   directory, `DIR/step_times.json`, see step_time.py), not the runs' wall clock, which the
   machine's load moves as much as the arm does;
4. recall (`pkmlm.metrics.recall.evaluate_recall`) of every checkpoint, into `DIR/results.jsonl`
   (one row per checkpoint) and `<run>/recall.json` (the final one, which pkmlm-compare reads);
   `DIR/table.md`: per N, dense and memory at equal exposures and dense at equal time;
   `DIR/bits_vs_exposures.png`: every checkpoint's bits stored vs exposures and vs training time;
   and where the bits go (`attribute_rows`): each attribute's share of its bits, and how each
   product-key memory's table is read while answering the questions (`question_usage`, measured
   once per run into `<run>/sweep_usage.jsonl`); `--results FILE` writes both tables as results
   files (`FILE` and `<FILE stem>_attributes.json`).

Jobs run `--jobs` at a time, each with `--threads` threads, under `nice`.

Arms (`--arms`, issue 21): `dense` and `mem` (the presets as they are: `knowledge/mem` is now the
128^2 arm, so `mem` and `mem128` train the same model, as do `mix_mem` and `mix_mem128`; a sweep
directory from before that change holds 32^2 `mem-*` runs, which a resumed sweep reuses as they
are: start a new `--out` for the new preset), `mem64` / `mem128` / `mem256`
(the memory preset with a 64^2 / 128^2 / 256^2-slot table, 4 heads, knn 16, k_dim 64: 8x, 32x and
128x the 32.8k parameters of the FFN it replaces), `dense_pm` (the parameter-matched dense arm: the
FFN widened, `model.ffn_mult` computed by `param_matched_ffn_mult`, until the model's total
parameters equal the 128^2 memory model's: Csordas et al. 2023's baseline), and the mixture arms
`mix_dense` / `mix_mem128` (the biographies diluted in the Wikipedia sample, knowledge/mix_*), and
any other preset of configs/experiment/knowledge/ by its name, as it is (e.g. `engram`: Engram
tables of the 128^2 arm's table parameters beside layer 1, issue 23).
The equal-compute dense arms (`dense`, `mix_dense`) run `--dense-factor` times the equal-exposure
steps (dense_pm, slower per step than the memory arms, does not need to).
`--one-seed-arms` names arms that run only the first seed. With `--until-saturated`, N doubles
from the largest `--people` value until the dense arm saturates (mean bits at 2x the exposures
within 5% of those at 1x; needs `--dense-factor` >= 2) or `--max-people` is passed. The table
(`table.md`) gives each point's mean over seeds and the spread (min-max);
`bits_vs_people_mean.png` plots them with the spread as bars.

Resumable: run the same command again and the sweep continues where it stopped. Corpora and
tokenizers are kept; a run whose final checkpoint exists is not trained again; a half-finished run
is restarted with the same command, which resumes from its latest checkpoint (`resume=auto`); each
checkpoint's recall is kept in `<run>/sweep_recall.jsonl` and never evaluated twice. `--max-runs K`
trains at most K runs in this sitting and stops (the rest wait for the next sitting).
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
from pkmlm.knowledge.facts import ATTRIBUTES
from pkmlm.knowledge.step_time import anchor_arm, load_step_times, measure_step_times, with_reference_times

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
    from pkmlm.data.loader import load_or_train_tokenizer, resolve_data

    cfg = _compose(overrides + [f"data.files=[{bios}]"])
    tokenizer, _ = load_or_train_tokenizer(cfg.data, resolve_data(cfg.data), cfg.paths.cache_dir)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)  # a sweep killed mid-save leaves no half-written tokenizer behind


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


MEMORY_SIZES = {"mem64": 64, "mem128": 128, "mem256": 256}
PARAM_MATCHED_TO = "mem128"  # the dense_pm arm's FFN is widened to this arm's total parameters
SATURATION = 0.05  # the dense arm is saturated when 2x the exposures adds less than 5% bits


def memory_overrides(n_keys: int) -> list[str]:
    """The memory preset's layer with an n_keys^2 table, 4 heads, knn 16, k_dim 64 (issue 21)."""
    return [f"model.memory.n_keys={n_keys}", "model.memory.heads=4", "model.memory.knn=16", "model.memory.k_dim=64"]


def arm_spec(arm: str, overrides: list[str]) -> tuple[str, list[str]]:
    """`(experiment preset, extra overrides)` of an arm name (see the module docstring)."""
    if arm in ("dense", "mem", "mix_dense", "mix_mem"):
        return f"knowledge/{arm}", []
    if arm != "common" and (Path(config_dir()) / "experiment" / "knowledge" / f"{arm}.yaml").is_file():
        return f"knowledge/{arm}", []  # any other preset of the family, as it is (e.g. a memory variant's arm)
    if arm in MEMORY_SIZES:
        return "knowledge/mem", memory_overrides(MEMORY_SIZES[arm])
    if arm == "mix_mem128":
        return "knowledge/mix_mem", memory_overrides(128)
    if arm == "dense_pm":
        return "knowledge/dense", [f"model.ffn_mult={param_matched_ffn_mult(overrides)!r}"]
    raise SystemExit(
        f"sweep: unknown arm {arm!r}: use dense, dense_pm, mem, mem64, mem128, mem256, mix_dense, mix_mem, mix_mem128 "
        "or a preset of configs/experiment/knowledge/"
    )


def _total_params(overrides: list[str]) -> tuple[int, Any]:
    import dataclasses

    from pkmlm.model import Transformer

    cfg = _compose(overrides)
    # model.vocab_size 0 = the tokenizer's size, data.vocab_size for a trained BPE (as pkmlm-train)
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size)
    return Transformer(model).count_parameters()["total"], model


def param_matched_ffn_mult(overrides: list[str]) -> float:
    """`model.ffn_mult` whose dense model has the total parameters of the `PARAM_MATCHED_TO` memory
    model (nearest FFN width; every layer's FFN widened alike). A dense model's parameters grow by
    n_layers x 2 x dim per unit of FFN width (up and down projections, no biases): counted here on
    two built models, not assumed."""
    target, _ = _total_params(
        ["experiment=knowledge/mem", *overrides, *memory_overrides(MEMORY_SIZES[PARAM_MATCHED_TO])]
    )
    base, model = _total_params(["experiment=knowledge/dense", *overrides])
    wider, _ = _total_params(
        ["experiment=knowledge/dense", *overrides, f"model.ffn_mult={(model.ffn_mult * model.dim + 1) / model.dim!r}"]
    )
    per_unit = wider - base
    hidden = int(model.ffn_mult * model.dim) + round((target - base) / per_unit)
    return hidden / model.dim


def _train_command(
    experiment: str, run_dir: Path, bios: Path | None, steps: int, max_steps: int, seed: int, extra: list[str]
) -> list[str]:
    every = steps // CHECKPOINTS_PER_RUN
    return [
        sys.executable,
        "-m",
        "pkmlm.cli.train",
        f"experiment={experiment}",
        *([f"data.files=[{bios}]"] if bios is not None else []),
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


def evaluate_run(
    run_dir: Path,
    qa: Path,
    per_bio: float,
    people: int,
    templates: int,
    skip: set[int] | None = None,
    bios_share: float = 1.0,
) -> list[dict]:
    """Recall of every checkpoint of a run (but the steps in `skip`), oldest first; writes
    `<run>/recall.json` (the last evaluated). `exposures`: biographies read per person, the run's
    tokens x `bios_share` (the biographies' share of a mixture's tokens; 1 for the biographies
    alone) over the tokens of one person's biographies."""
    from pkmlm.checkpoint.store import list_checkpoints
    from pkmlm.metrics.recall import evaluate_recall
    from pkmlm.run import load_run

    times = _train_times(run_dir)
    rows = []
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        if skip and int(ckpt.name[5:13]) in skip:
            continue
        run = load_run(ckpt)
        metrics = evaluate_recall(run.model, run.tokenizer, qa)
        step_time = times.get(run.step, max((t for s, t in times.items() if s <= run.step), default=None))
        rows.append(
            {
                "step": run.step,
                "tokens": run.tokens,
                "exposures": run.tokens * bios_share / (per_bio * people),
                "train_time_s": step_time,
                **metrics,
            }
        )
    if rows:
        (run_dir / "recall.json").write_text(json.dumps({"step": rows[-1]["step"], **rows[-1]}, indent=1) + "\n")
    return rows


def time_key(rows: list[dict]) -> str | None:
    """The training time the rows are compared by: the reference time (`ref_time_s`: steps x the
    arm's step time measured with all arms in turns, step_time.py) when every row has one, else the
    runs' wall-clock time (`train_time_s`, which the machine's load at training time moves too)."""
    for key in ("ref_time_s", "train_time_s"):
        if rows and all(r.get(key) for r in rows):
            return key
    return None


def equal_time_pick(mem: dict, dense: list[dict]) -> dict | None:
    """The dense checkpoint nearest the memory row's training time; None when the dense run stopped
    before that time (its last checkpoint is then only the longest the dense arm ran, not an
    equal-time point) or the times are not known."""
    key = time_key([mem, *dense])
    if key is None or not dense or max(r[key] for r in dense) < mem[key]:
        return None
    return min(dense, key=lambda r: abs(r[key] - mem[key]))


def _fmt(row: dict | None, key: str, spec: str) -> str:
    return "n/a" if row is None or row.get(key) is None else format(row[key], spec)


def summary_table(results: list[dict]) -> str:
    """Per N and seed, every point of `_points` (each arm at equal exposures, each dense arm at each
    sparse arm's training time): `MEAN_COLUMNS` without the seed count, one seed a row."""
    columns = ["N (seed)", *MEAN_COLUMNS[1:3], *MEAN_COLUMNS[4:]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for people, seed in sorted({(r["people"], r["seed"]) for r in results}):
        for row in mean_rows([r for r in results if r["people"] == people and r["seed"] == seed]):
            cells = [f"{people} (seed {seed})", *row[1:3], *row[4:]]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _final_checkpoint(run_dir: Path, max_steps: int) -> Path:
    return run_dir / "checkpoints" / f"step_{max_steps:08d}.dcp"


def run_finished(run_dir: Path, max_steps: int) -> bool:
    """Whether the run's final checkpoint is there, complete (its metadata written last)."""
    return (_final_checkpoint(run_dir, max_steps) / ".metadata").is_file()


def mixture_overrides(bios: Path, overrides: list[str], bios_weight: float | None = None) -> list[str]:
    """data.sources of the mix_* presets with the sweep's biographies as the bios source (its document
    weight `bios_weight` where given: `--bios-share`)."""
    cfg = _compose(["experiment=knowledge/mix_dense", *overrides])
    parts = []
    for src in cfg.data.sources:
        files = [str(bios)] if src.name == "bios" else [str(Path(f).expanduser().resolve()) for f in src.files]
        weight = bios_weight if src.name == "bios" and bios_weight is not None else src.weight
        parts.append(f"{{name:{src.name},files:[{','.join(files)}],weight:{weight!r}}}")
    return ["data.files=[]", f"data.sources=[{','.join(parts)}]"]


def bios_token_share(bios: Path, overrides: list[str], per_bio: float, sample_docs: int = 200) -> float:
    """The biographies' share of the mixture's tokens: documents are drawn by weight (knowledge/mix_*),
    so share = w_bios x tokens per biography / sum over sources of w x mean tokens per document
    (the other sources' means over their first `sample_docs` documents, under the runs' tokenizer)."""
    bios_weight, others = _mixture_token_mass(overrides, sample_docs)
    return bios_weight * per_bio / (bios_weight * per_bio + others)


def bios_weight_for_share(share: float, overrides: list[str], per_bio: float, sample_docs: int = 200) -> float:
    """The bios source's document weight that makes the biographies `share` of the mixture's tokens
    (the other sources' weights as the presets have them): solves share = w x per_bio / (w x per_bio
    + sum over the others of w x mean tokens per document)."""
    _, others = _mixture_token_mass(overrides, sample_docs)
    return share * others / ((1.0 - share) * per_bio)


def _mixture_token_mass(overrides: list[str], sample_docs: int) -> tuple[float, float]:
    """`(the bios source's weight, sum over the other sources of weight x mean tokens per document)`,
    the means over each source's first `sample_docs` documents under the runs' tokenizer."""
    import gzip

    from pkmlm.data.tokenizer import encode_documents, load_tokenizer

    cfg = _compose(["experiment=knowledge/mix_dense", *overrides])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    bios_weight, total = 0.0, 0.0
    for src in cfg.data.sources:
        if src.name == "bios":
            bios_weight = src.weight
            continue
        texts: list[str] = []  # the sample's jsonl(.gz) files, one {"text": ...} document a line
        for name in src.files:
            opener = gzip.open if str(name).endswith(".gz") else open
            with opener(Path(name).expanduser(), "rt") as f:
                for line in f:
                    if len(texts) >= sample_docs:
                        break
                    texts.append(json.loads(line)["text"])
        mean = sum(len(ids) + 1 for ids in encode_documents(tokenizer, texts)) / max(len(texts), 1)
        total += src.weight * mean
    return bios_weight, total


def plan_level(args: argparse.Namespace, out: Path, people: int) -> list[dict]:
    """The runs of one N: corpora and tokenizers made (or kept), and per seed and arm the training
    command, run directory and step counts."""
    from pkmlm.knowledge.facts import write_corpus

    plans = []
    arms = args.arms.split(",")
    one_seed = set(filter(None, args.one_seed_arms.split(",")))
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:
        tokenizer = out / "facts" / f"tokenizer-s{seed}.json"
        overrides = [*args.overrides, f"data.tokenizer={tokenizer.resolve()}"]
        facts = out / "facts" / f"N{people}-s{seed}"
        if not ((facts / "bios.jsonl").is_file() and (facts / "qa.jsonl").is_file()):
            write_corpus(facts, people, seed, args.templates)
        if not tokenizer.is_file():  # trained on the first N of the sweep (the largest of --people)
            shared_tokenizer(facts / "bios.jsonl", tokenizer, ["experiment=knowledge/dense", *args.overrides])
        steps, per_bio = steps_for(
            facts / "bios.jsonl", args.exposures, args.templates, ["experiment=knowledge/dense", *overrides]
        )
        for arm in arms:
            if arm in one_seed and seed != seeds[0]:
                continue
            experiment, extra = arm_spec(arm, overrides)
            arm_steps, share = steps, 1.0
            if arm.startswith("mix_"):
                weight = None if args.bios_share is None else bios_weight_for_share(args.bios_share, overrides, per_bio)
                mixture = mixture_overrides((facts / "bios.jsonl").resolve(), overrides, weight)
                extra = [*extra, *mixture]
                share = bios_token_share(facts / "bios.jsonl", [*overrides, *mixture], per_bio)
                arm_steps = CHECKPOINTS_PER_RUN * math.ceil(steps / share / CHECKPOINTS_PER_RUN)
            run_dir = out / "runs" / f"{arm}-N{people}-s{seed}"
            # The equal-compute dense arms run longer for their equal-time point; dense_pm is slower
            # per step than any memory arm, so its equal-time point lies within its 1x run.
            # --sparse-factor: the sparse arms past their equal-exposure steps too (their own saturation)
            factor = (
                args.dense_factor if arm in ("dense", "mix_dense") else 1.0 if _is_dense(arm) else args.sparse_factor
            )
            max_steps = CHECKPOINTS_PER_RUN * math.ceil(arm_steps * factor / CHECKPOINTS_PER_RUN)
            bios = None if arm.startswith("mix_") else facts / "bios.jsonl"  # a mixture names its sources
            command = _train_command(experiment, run_dir, bios, arm_steps, max_steps, seed, [*overrides, *extra])
            plans.append(
                {
                    "arm": arm,
                    "people": people,
                    "seed": seed,
                    "steps_equal": arm_steps,
                    "max_steps": max_steps,
                    "tokens_per_bio": per_bio,
                    "bios_share": share,  # the biographies' share of the run's tokens (a mixture's < 1)
                    "run_dir": run_dir,
                    "facts": facts,
                    "command": command,
                    "overrides": [f"experiment={experiment}", *overrides, *extra],
                    "base_overrides": overrides,
                }
            )
    return plans


def reference_step_times(out: Path, plans: list[dict], threads: int, repeats: int) -> dict:
    """`out/step_times.json`, with the step times of the plans' arms it lacked measured now (one
    config per arm: the first seed's; an arm's step does not depend on the seed; `repeats` 0: none
    measured, the wall-clock times are compared)."""
    if repeats <= 0:
        return load_step_times(out)
    configs = {}
    for plan in plans:
        configs.setdefault(plan["arm"], plan["overrides"])
    known = load_step_times(out).get("step_ms", {})
    missing = {arm: o for arm, o in configs.items() if arm not in known}
    if not missing:
        return load_step_times(out)
    anchor, anchor_config = anchor_arm(known), None
    if anchor is not None:  # a new arm on a sweep timed before: timed against one of its arms
        experiment, extra = arm_spec(anchor, plans[0]["base_overrides"])
        anchor_config = _compose([f"experiment={experiment}", *plans[0]["base_overrides"], *extra])
    against = f" (in turns with {anchor}, scaled to its earlier time)" if anchor else ""
    print(f"measuring the reference step time of {', '.join(sorted(missing))}{against}", file=sys.stderr, flush=True)
    configs = {arm: _compose(o) for arm, o in missing.items()}
    return measure_step_times(out, configs, threads, repeats=repeats, anchor_config=anchor_config)


def evaluate_cached(plan: dict, templates: int) -> list[dict]:
    """`evaluate_run`'s rows for the plan's run, each checkpoint evaluated once ever: the rows are
    kept in `<run>/sweep_recall.jsonl` and only checkpoints not in it are evaluated."""
    from pkmlm.checkpoint.store import list_checkpoints

    run_dir = Path(plan["run_dir"])
    cache = run_dir / "sweep_recall.jsonl"
    rows = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    steps = {int(p.name[5:13]) for p in list_checkpoints(run_dir / "checkpoints")}
    share = plan.get("bios_share", 1.0)
    if steps - set(rows):
        fresh = evaluate_run(
            run_dir,
            Path(plan["facts"]) / "qa.jsonl",
            plan["tokens_per_bio"],
            plan["people"],
            templates,
            skip=set(rows),
            bios_share=share,
        )
        with open(cache, "a") as f:
            for row in fresh:
                rows[row["step"]] = row
                f.write(json.dumps(row) + "\n")
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.items() if k not in ("command", "overrides")}
    # exposures from the tokens, here: rows cached before a mixture's share was counted said 2x for 0.5
    per_person = plan["tokens_per_bio"] * plan["people"]
    return [{**meta, **rows[step], "exposures": rows[step]["tokens"] * share / per_person} for step in sorted(rows)]


def dense_saturated(results: list[dict], people: int) -> bool:
    """Whether the dense arm at N=`people` is saturated: its mean bits over seeds at twice the
    equal-exposure steps within `SATURATION` of those at the equal-exposure steps."""
    rows = [r for r in results if r["arm"] == "dense" and r["people"] == people]
    at_1 = [r["recall/bits"] for r in rows if r["step"] == r["steps_equal"]]
    at_2 = [r["recall/bits"] for r in rows if r["step"] == 2 * r["steps_equal"]]
    if not at_1 or not at_2:
        return False
    one, two = sum(at_1) / len(at_1), sum(at_2) / len(at_2)
    return two <= (1 + SATURATION) * one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pkmlm.knowledge.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--people", default="50,100,200", help="comma-separated N values")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (corpus and run)")
    p.add_argument("--exposures", type=float, default=150.0, help="biographies read per person (equal-exposure arms)")
    p.add_argument("--templates", type=int, default=5)
    p.add_argument(
        "--arms",
        default="dense,mem",
        help="comma-separated: dense, dense_pm, mem, mem64, mem128, mem256, mix_dense, mix_mem, mix_mem128",
    )
    p.add_argument("--one-seed-arms", default="", help="arms that run only the first seed (e.g. mem64,mem256)")
    p.add_argument(
        "--dense-factor",
        type=float,
        default=1.5,
        help="the dense arms train this many times the "
        "equal-exposure steps (its checkpoints give the equal-time point; >= 2 for --until-saturated)",
    )
    p.add_argument(
        "--sparse-factor",
        type=float,
        default=1.0,
        help="the sparse arms (memories, Engram) train this many times the equal-exposure steps (2: "
        "their bits at 2x the exposures, next to the dense arm's: does the memory saturate higher?); "
        "raising it later extends their finished runs from their last checkpoint",
    )
    p.add_argument(
        "--until-saturated",
        action="store_true",
        help="after the --people values, double N until the dense arm saturates (or --max-people)",
    )
    p.add_argument("--max-people", type=int, default=25600, help="the largest N --until-saturated tries")
    p.add_argument(
        "--bios-share",
        type=float,
        default=None,
        help="mix_* arms: the biographies' share of the mixture's tokens, in (0, 1) (the bios source's "
        "document weight is set to give it); default: the presets' weights (~1/70 of the tokens)",
    )
    p.add_argument("--max-runs", type=int, default=None, help="train at most this many runs in this sitting, then stop")
    p.add_argument(
        "--step-time-repeats",
        type=int,
        default=15,
        help="turns of the arms' reference step-time measurement (DIR/step_times.json, the equal-time "
        "comparison's clock; 0: compare the runs' wall-clock times instead)",
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
    p.add_argument(
        "--results",
        metavar="PATH",
        default=None,
        help="also write the mean table as a results file (docs/results/*.json: the README's table, with "
        "the commits the runs were trained at); with --max-runs 0, a report of a sweep in progress",
    )
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
        _write_results(args, argv, results)
        return
    if args.bios_share is not None and not 0.0 < args.bios_share < 1.0:
        raise SystemExit(f"sweep: --bios-share must be in (0, 1), got {args.bios_share}: e.g. 0.5 for half the tokens")
    if args.sparse_factor < 1.0:
        raise SystemExit(f"sweep: --sparse-factor must be >= 1 (got {args.sparse_factor}): 1 stops at equal exposures")
    if args.until_saturated and args.dense_factor < 2:
        raise SystemExit(
            "sweep: --until-saturated needs --dense-factor >= 2 (the dense arm's bits at 2x the exposures)"
        )
    t0 = time.time()
    levels = sorted((int(n) for n in args.people.split(",")), reverse=True)  # longest first: its tokenizer
    budget = args.max_runs
    results: list[dict[str, Any]] = []
    step_ms = load_step_times(out).get("step_ms", {})
    stopped = False
    while levels:
        people = levels.pop(0)
        plans = plan_level(args, out, people)
        todo = [plan for plan in plans if not run_finished(plan["run_dir"], plan["max_steps"])]
        if budget is not None:
            todo, stopped = todo[:budget], stopped or len(todo) > budget
            budget -= len(todo)
        print(f"N={people}: {len(plans)} runs, {len(todo)} to train now", file=sys.stderr, flush=True)
        if todo:  # every arm's reference step time, once per sweep directory (see step_time.py)
            step_ms = reference_step_times(out, plans, args.threads, args.step_time_repeats).get("step_ms", {})
        _run_jobs(
            [(plan["command"], out / "logs" / f"{plan['run_dir'].name}.log") for plan in todo], args.jobs, args.threads
        )
        for plan in plans:
            if (plan["run_dir"] / "checkpoints").is_dir():
                results.extend(evaluate_cached(plan, args.templates))
        if stopped:
            print(f"stopped after --max-runs {args.max_runs}: run the same command again to continue", file=sys.stderr)
            break
        largest = max(r["people"] for r in results) if results else people
        if args.until_saturated and not levels:
            if dense_saturated(results, largest):
                print(f"dense arm saturated at N={largest}", file=sys.stderr, flush=True)
            elif 2 * largest <= args.max_people:
                levels.append(2 * largest)
    results = with_reference_times(results, step_ms)
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    print(report(results, out, f"wall time of this sitting: {time.time() - t0:.0f} s"), flush=True)
    _write_results(args, argv, results)


def _write_results(args: argparse.Namespace, argv: list[str] | None, results: list[dict]) -> None:
    if args.results:
        command = "python -m pkmlm.knowledge.sweep " + " ".join(sys.argv[1:] if argv is None else argv)
        write_results(results, Path(args.results), command, args.threads, "mean over seeds (min-max)")
        print(f"wrote {args.results} and {attribute_results_path(Path(args.results))}", file=sys.stderr)


def _is_dense(arm: str) -> bool:
    """Dense arms (`dense`, `dense_pm`, `mix_dense`): every other arm (the memory sizes, `engram`,
    any preset by name) holds a sparse table and is compared with them at equal training time."""
    return "dense" in arm


def _same_data(arm: str, other: str) -> bool:
    """Whether two arms train on the same corpus: the mixture arms (`mix_*`, biographies diluted in
    web text) only with each other."""
    return arm.startswith("mix_") == other.startswith("mix_")


def _points(results: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """Per (N, label): one row per seed. Every arm at its equal-exposure step and, where it ran that
    long, at twice it; each dense arm also at the training time of each sparse arm's equal-exposure
    point and of its 2x point (`... at 2x`; the dense checkpoint nearest that time, when it ran that long)."""
    points: dict[tuple[int, str], list[dict]] = {}
    for people, seed in sorted({(r["people"], r["seed"]) for r in results}):
        rows = [r for r in results if r["people"] == people and r["seed"] == seed]
        equal = {r["arm"]: r for r in rows if r["step"] == r["steps_equal"]}
        for arm, r in sorted(equal.items()):
            points.setdefault((people, f"{arm} (equal exposures)"), []).append(r)
        double = {r["arm"]: r for r in rows if r["step"] == 2 * r["steps_equal"]}
        for arm, r in sorted(double.items()):  # where an arm ran that long: its bits at 2x (saturation)
            points.setdefault((people, f"{arm} (2x exposures)"), []).append(r)
        for suffix, sparse in (("", equal), (" at 2x", double)):  # dense at each sparse point's time
            for mem_arm, m in sorted(sparse.items()):
                if _is_dense(mem_arm):
                    continue
                dense_arms = {r["arm"] for r in rows if _is_dense(r["arm"]) and _same_data(r["arm"], mem_arm)}
                for dense_arm in sorted(dense_arms):
                    pick = equal_time_pick(m, [r for r in rows if r["arm"] == dense_arm])
                    if pick is not None:
                        label = f"{dense_arm} (equal time to {mem_arm}{suffix})"
                        points.setdefault((people, label), []).append(pick)
    return points


def _mean_spread(values: list[float], spec: str) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    return f"{format(mean, spec)} ({format(min(values), spec)}-{format(max(values), spec)})"


MEAN_COLUMNS = (
    "N",
    "bits available",
    "arm",
    "seeds",
    "exposures",
    "train time s (reference)",
    "wall time s",
    "exact match",
    "bits stored",
    "bits / param (total)",
    "bits / param (active)",
    "bits / table param",
    "bits / param (non-embedding)",
)


TABLE_KEY, ACTIVE_KEY = "recall/bits_per_param/memory_values", "recall/bits_per_param/active"


def mean_rows(results: list[dict]) -> list[list[Any]]:
    """Per N and point (see `_points`): the number of seeds, and each metric's mean over seeds with
    its spread (min-max) in brackets, in the order of `MEAN_COLUMNS`. Table params: a memory's value
    tables and Engram's hashed tables (`recall/params/memory_values`); n/a for a dense arm."""
    out = []
    for (people, label), rows in sorted(_points(results).items()):
        non_emb = [
            r["recall/bits"] / (r["recall/params/total"] - r["recall/params/embedding"])
            for r in rows
            if r["recall/params/total"] > r["recall/params/embedding"]
        ]
        # absent: for a model without tables; for the rows of sweeps from before issue 21 (active)
        per_table = [r[TABLE_KEY] for r in rows if TABLE_KEY in r]
        per_active = [r[ACTIVE_KEY] for r in rows if ACTIVE_KEY in r]
        out.append(
            [
                people,
                f"{rows[0]['recall/bits_available']:,.0f}",
                label,
                len(rows),
                _mean_spread([r["exposures"] for r in rows], ".0f"),
                _mean_spread([r["ref_time_s"] for r in rows if r.get("ref_time_s")], ".0f"),
                _mean_spread([r["train_time_s"] for r in rows if r.get("train_time_s")], ".0f"),
                _mean_spread([r["recall/exact_match"] for r in rows], ".1%"),
                _mean_spread([r["recall/bits"] for r in rows], ",.0f"),
                _mean_spread([r["recall/bits_per_param/total"] for r in rows], ".4f"),
                _mean_spread(per_active, ".4f"),
                _mean_spread(per_table, ".4f"),
                _mean_spread(non_emb, ".4f"),
            ]
        )
    return out


def mean_table(results: list[dict]) -> str:
    """`mean_rows` as a markdown table."""
    lines = ["| " + " | ".join(MEAN_COLUMNS) + " |", "|" + "---|" * len(MEAN_COLUMNS)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in mean_rows(results)]
    return "\n".join(lines) + "\n"


# Where the bits go (issue 21: "if the memory does not beat dense, show why with evidence"): per
# attribute, and how much of a memory's table the runs read.


def bits_per_attribute(facts: str | Path) -> dict[str, float] | None:
    """Bits per person of each attribute, from the corpus's `meta.json`; None when the corpus is not
    here (a merged sweep from another machine) or its meta is unreadable."""
    try:
        bits = json.loads((Path(facts) / "meta.json").read_text())["bits_per_attribute"]
        return {a: float(bits[a]) for a in ATTRIBUTES}
    except (OSError, ValueError, KeyError, TypeError):
        return None


USAGE_STATS = ("usage", "kl_count", "top90")  # memory_usage.MemoryUsage's statistics the table shows


def question_usage(run_dir: str | Path, step: int, qa: str | Path) -> dict[str, float]:
    """How the run's memory layers are read while its checkpoint at `step` answers the sweep's
    questions (every question of `qa`, the teacher-forced pass `evaluate_recall` scores, here in
    batches of one length so that no padding is read): per `USAGE_STATS`, the mean over memory
    layers of `usage` (share of the table's slots read), `kl_count` (KL of the slots' read counts to
    uniform, nats) and `top90` (slots holding 90% of the read weight). The questions are every fact
    of every person, so this is the part of the table the facts use, not the 10 held-out biographies
    of the run's own evaluation. Measured once per (run, step, questions file), kept in
    `<run>/sweep_usage.jsonl` (a line that does not parse is measured again); {} for a model without
    product-key memory layers (dense arms, Engram), or where the checkpoint or `qa` is not here (a
    merged sweep from another machine). A run directory that cannot be written to is measured, not cached."""
    run_dir, qa = Path(run_dir), Path(qa)
    cache = run_dir / "sweep_usage.jsonl"
    if cache.is_file():
        for line in cache.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["step"] == step and row["qa"] == str(qa):
                    return dict(row["usage"])
            except (ValueError, KeyError, TypeError):
                continue
    checkpoint = _final_checkpoint(run_dir, step)
    if not (checkpoint / ".metadata").is_file() or not qa.is_file():
        return {}
    from pkmlm.metrics.continuations import score_continuations
    from pkmlm.metrics.memory_usage import memory_layers_of, memory_metrics, track_memory_usage
    from pkmlm.metrics.recall import read_questions, recall_requests
    from pkmlm.run import load_run

    run = load_run(checkpoint)
    usage: dict[str, float] = {}
    if memory_layers_of(run.model):
        by_length: dict[int, list] = {}
        for request in recall_requests(run.tokenizer, read_questions(qa)):
            by_length.setdefault(len(request[0]) + len(request[1]), []).append(request)
        window = run.model.cfg.max_seq_len  # as evaluate_recall: a longer question keeps its last tokens
        with track_memory_usage(run.model) as trackers:
            for length, requests in sorted(by_length.items()):
                score_continuations(run.model, requests, max_len=min(length, window), batch_size=64)
        metrics = memory_metrics(trackers)
        for stat in USAGE_STATS:
            values = [metrics[f"memory/layer{i}/{stat}"] for i in sorted(trackers)]
            usage[stat] = sum(values) / len(values)
    try:
        with open(cache, "a") as f:
            f.write(json.dumps({"step": step, "qa": str(qa), "usage": usage}) + "\n")
    except OSError:
        pass  # a read-only run directory (another machine's sweep): reported, measured again next time
    return usage


ATTRIBUTE_COLUMNS = (
    "N",
    "arm",
    "seeds",
    *ATTRIBUTES,
    "slots read",
    "read counts: KL to uniform",
    "slots with 90% of the weight",
)


ATTRIBUTE_NOTE = (
    "each attribute's bits stored as a share of the bits it holds (N x log2 of its number of values), "
    "mean over seeds (min-max); product-key memory arms at equal exposures, while answering every "
    "question (all N x 6 facts): the share of the table's slots read, the KL of the slots' read counts to "
    "uniform (nats) and the slots holding 90% of the read weight"
)


def attribute_rows(results: list[dict]) -> list[list[Any]]:
    """Per N and point (see `_points`): each attribute's bits stored as a share of the bits it
    holds (N x log2 of its values), and for product-key memory arms at equal exposures how their
    table is read while answering the questions (`question_usage`), mean over seeds (min-max), in
    `ATTRIBUTE_COLUMNS` order."""
    out = []
    meta: dict[str, dict[str, float] | None] = {}
    for (people, label), rows in sorted(_points(results).items()):
        cells: list[Any] = [people, label, len(rows)]
        for a in ATTRIBUTES:
            shares = []
            for r in rows:
                facts = str(r.get("facts", ""))
                if facts not in meta:
                    meta[facts] = bits_per_attribute(facts) if facts else None
                key = f"recall/by_attribute/{a}/bits"
                if meta[facts] and key in r:
                    shares.append(r[key] / (people * meta[facts][a]))
            cells.append(_mean_spread(shares, ".0%"))
        usages = [
            question_usage(r["run_dir"], r["step"], Path(r["facts"]) / "qa.jsonl")
            if label.endswith("(equal exposures)") and not _is_dense(r["arm"]) and r.get("run_dir") and r.get("facts")
            else {}
            for r in rows
        ]
        cells.append(_mean_spread([u["usage"] for u in usages if "usage" in u], ".1%"))
        cells.append(_mean_spread([u["kl_count"] for u in usages if "kl_count" in u], ".2f"))
        cells.append(_mean_spread([u["top90"] for u in usages if "top90" in u], ",.0f"))
        out.append(cells)
    return out


def attribute_table(results: list[dict]) -> str:
    """`attribute_rows` as a markdown table."""
    lines = ["| " + " | ".join(ATTRIBUTE_COLUMNS) + " |", "|" + "---|" * len(ATTRIBUTE_COLUMNS)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in attribute_rows(results)]
    return "\n".join(lines) + "\n"


def run_commits(results: list[dict]) -> str:
    """The git commits the rows' runs were trained at (each run's last checkpoint's `code_version`;
    `+dirty` for a tree with uncommitted changes), short, sorted, comma-separated; `unknown` for a
    run whose checkpoints are not here (a merged sweep from another machine)."""
    from pkmlm.checkpoint.store import list_checkpoints

    commits = set()
    for run_dir in sorted({r.get("run_dir", "") for r in results}):
        checkpoints = list_checkpoints(Path(run_dir) / "checkpoints") if run_dir else []
        try:
            version = json.loads((checkpoints[-1] / "meta.json").read_text())["code_version"]
            commits.add(version["commit"][:7] + ("+dirty" if version.get("dirty") else ""))
        except (IndexError, OSError, ValueError, KeyError, TypeError):
            commits.add("unknown")
    return ", ".join(sorted(commits)) or "unknown"


def attribute_results_path(path: Path) -> Path:
    """Where `write_results` puts the where-the-bits-go table beside the sweep's: `<stem>_attributes.json`."""
    path = Path(path)
    return path.with_name(path.stem + "_attributes" + path.suffix)


def write_results(results: list[dict], path: Path, command: str, threads: Any, note: str) -> None:
    """`mean_rows` as a results file (`pkmlm.results`, docs/results/README.md): the README's table of
    the sweep, and `attribute_rows` beside it (`attribute_results_path`). Their `commit` is this
    process's (the code that scored recall and timed the steps); the commits the runs were trained at
    (`run_commits`) are in the note."""
    import datetime

    import torch

    from pkmlm.results import cpu_model
    from pkmlm.train.rundir import code_version

    version = code_version()
    trained = f"runs trained at {run_commits(results)}"
    data = {
        "command": command,
        "commit": (version["commit"] or "unknown")[:7],
        "date": str(datetime.date.today()),
        "machine": cpu_model(),
        "torch": torch.__version__,
        "threads": threads,
        "load": "runs under changing load (times: reference step times, step_times.json); report at load average "
        + "%.1f" % os.getloadavg()[0],
        "columns": list(MEAN_COLUMNS),
        "rows": mean_rows(results),
        "note": f"{note}; {trained}",
    }
    attributes = {
        **data,
        "columns": list(ATTRIBUTE_COLUMNS),
        "rows": attribute_rows(results),
        "note": f"{ATTRIBUTE_NOTE}; {trained}",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    attribute_results_path(path).write_text(json.dumps(attributes, indent=1, ensure_ascii=False) + "\n")


def mean_plot(results: list[dict], path: Path) -> None:
    """Bits stored vs N at equal exposures, one line per arm: the mean over seeds, the spread
    (min-max) as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_arm: dict[str, list[tuple[int, list[float]]]] = {}
    for (people, label), rows in sorted(_points(results).items()):
        if label.endswith("(equal exposures)"):
            by_arm.setdefault(label.split(" ")[0], []).append((people, [r["recall/bits"] for r in rows]))
    for arm, pts in sorted(by_arm.items()):
        xs = [n for n, _ in pts]
        means = [sum(v) / len(v) for _, v in pts]
        err = [[m - min(v) for m, (_, v) in zip(means, pts)], [max(v) - m for m, (_, v) in zip(means, pts)]]
        ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, label=arm)
    available = sorted({(r["people"], r["recall/bits_available"]) for r in results})
    ax.plot([n for n, _ in available], [b for _, b in available], linestyle="--", color="gray", label="available")
    ax.set_xscale("log")
    ax.set_xlabel("people N")
    ax.set_ylabel("bits stored (mean over seeds, min-max bars)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], out: Path, note: str) -> str:
    """`out/table.md` (the summary table and `note`), `out/bits_vs_exposures.png`,
    `out/bits_vs_people.png` and `out/bits_vs_parameters.png` for the sweep's rows; returns the table."""
    table = mean_table(results) + "\nPer seed:\n\n" + summary_table(results)
    table += "\nWhere the bits go (" + ATTRIBUTE_NOTE + "):\n\n" + attribute_table(results)
    if results:
        mean_plot(results, out / "bits_vs_people_mean.png")
        exposure_plot(results, out / "bits_vs_exposures.png")
        people_plot(results, out / "bits_vs_people.png", out / "bits_vs_parameters.png")
    (out / "table.md").write_text(table + f"\n{note}\n")
    return table


SEED_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "v")]  # (line style, marker) per seed


def seed_style(seed: int, seeds: list[int]) -> tuple[str, str]:
    """(line style, marker) of a seed: its place among the sweep's sorted seeds, cycled."""
    return SEED_STYLES[seeds.index(seed) % len(SEED_STYLES)]


def line_styles(results: list[dict]) -> dict[tuple, dict]:
    """Per run (arm, N, seed): its line's matplotlib keywords. One colour per (arm, N) (tab10 up to 10
    of them, tab20 beyond), one line style and marker per seed, and a legend label on each (arm, N)'s
    first seed only (`label` None on the others)."""
    import matplotlib

    runs = sorted({(r["arm"], r["people"], r["seed"]) for r in results})
    arms = sorted({(arm, people) for arm, people, _ in runs})
    seeds = sorted({seed for _, _, seed in runs})
    first_seed: dict[tuple, int] = {}
    for arm, people, seed in runs:  # sorted: an (arm, N)'s first run has its first seed
        first_seed.setdefault((arm, people), seed)
    cmap = matplotlib.colormaps["tab10" if len(arms) <= 10 else "tab20"]
    styles = {}
    for arm, people, seed in runs:
        line, marker = seed_style(seed, seeds)
        styles[(arm, people, seed)] = dict(
            color=cmap(arms.index((arm, people)) % cmap.N),
            linestyle=line,
            marker=marker,
            markersize=4,
            label=f"{arm}, N={people}" if first_seed[(arm, people)] == seed else None,
        )
    return styles


def exposure_plot(results: list[dict], path: Path) -> None:
    """Bits stored vs exposures (and vs training time), one line per run: the checkpoints of each run
    (constant schedule: each checkpoint is the run of that length). One colour per arm and N, one
    line style per seed (the legend names each arm once and the styles once): with one colour per
    line, a 10-colour cycle gave two arms one colour past 10 runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pkmlm.experiments.report import save_bits_figure

    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    styles = line_styles(results)
    for key, style in styles.items():
        rows = sorted((r for r in results if (r["arm"], r["people"], r["seed"]) == key), key=lambda r: r["step"])
        label = style.pop("label")
        ax_e.plot([r["exposures"] for r in rows], [r["recall/bits"] for r in rows], label=label, **style)
        time = time_key(rows) or "train_time_s"
        ax_t.plot([r.get(time) for r in rows], [r["recall/bits"] for r in rows], label=label, **style)
    seeds = sorted({r["seed"] for r in results})
    if len(seeds) > 1:  # the line styles' key, once
        for seed in seeds:
            line, marker = seed_style(seed, seeds)
            ax_e.plot([], [], color="black", linestyle=line, marker=marker, markersize=4, label=f"seed {seed}")
    for people in sorted({r["people"] for r in results}):
        available = next(r["recall/bits_available"] for r in results if r["people"] == people)
        for ax in (ax_e, ax_t):
            ax.axhline(available, linestyle="--", color="gray", linewidth=1)
    ax_e.set_xlabel("exposures per person (biographies read)")
    ax_t.set_xlabel("training time, s (reference step times; else wall clock)")
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
