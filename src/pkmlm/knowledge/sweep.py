"""The knowledge-capacity sweep: bits stored vs number of people N, dense vs memory, at equal
exposures and at equal training time.

`python -m pkmlm.knowledge.sweep --people 50,100,200 --seeds 0 --exposures 150 --out DIR`:

1. per seed and N, a pkmlm-facts corpus in `DIR/facts/N<N>-s<seed>/` (seeded by the run's seed),
   and one tokenizer per seed, trained as the presets say on the biographies of the largest
   `--people` value (`DIR/facts/tokenizer-s<seed>.json`) and kept for every N, the larger ones of
   `--until-saturated` too: a corpus holds the first people of every larger one (same value sets,
   same names), so every N is tokenized alike;
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
   (one row per checkpoint) and `<run>/recall.json` (the equal-exposure one, which pkmlm-compare reads);
   then the report (sweep_report.py): `DIR/table.md`, per N, dense and memory at equal exposures
   and dense at equal time; `DIR/bits_vs_exposures.png`, every checkpoint's bits stored vs exposures
   and vs training time; and where the bits go (`sweep_report.attribute_rows`): each attribute's
   share of its bits, and how each product-key memory's table is read while answering the
   questions (`sweep_report.question_usage`, measured once per run into `<run>/sweep_usage.jsonl`);
   `--results FILE` writes both tables as results files (`FILE` and `<FILE stem>_attributes.json`).

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

Decayed branches (`--decay 1,2`, decay.py): the runs train at a constant LR, which holds their
weights in a noise band below what they store once annealed; from each run's checkpoint at those
multiples of its equal-exposure steps (and the dense arm's where its branch meets a sparse arm's
in time), a branch with the LR decayed to 0 over a quarter of the equal-exposure steps, trained in
the run's job right after it, scored, archived and reported beside the constant-LR points (`...
(decayed from 1x)`; the saturation test and `--until-saturated` then read the decayed values).

Resumable: run the same command again and the sweep continues where it stopped. Corpora and
tokenizers are kept; a run whose final checkpoint exists is not trained again; a half-finished run
is restarted with the same command, which resumes from its latest checkpoint (`resume=auto`); each
checkpoint's recall is kept in `<run>/sweep_recall.jsonl` and never evaluated twice. `--max-runs K`
trains at most K runs in this sitting and stops (the rest wait for the next sitting). `--archive FILE`
keeps what every finished run left for the report (its recall rows, memory usage, commit, and the
sweep's step times; archive.py) in FILE, a file small enough to commit, and restores finished runs
from it into a directory that lost them (a machine reset): they are not trained again.
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
from pkmlm.knowledge import archive as run_archive
from pkmlm.knowledge import decay
from pkmlm.knowledge.step_time import anchor_arm, load_step_times, measure_step_times, with_reference_times
from pkmlm.knowledge.sweep_report import (
    SATURATION,
    attribute_results_path,
    dense_arm_of,
    gain_at_2x,
    is_dense,
    question_usage,
    report,
    usage_rows,
    write_results,
)

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
    return ffn_mult_for(int(model.ffn_mult * model.dim) + round((target - base) / per_unit), model.dim)


def ffn_mult_for(hidden: int, dim: int) -> float:
    """The `model.ffn_mult` whose FFN is `hidden` wide at `dim`. The model builds the width as
    int(ffn_mult * dim): hidden / dim can land a hair below hidden (29 / 100 * 100 = 28.999...); half a
    unit more truncates back to it (where hidden / dim is exact, as at the presets' d=64, it is kept:
    the runs' commands, and so their resume, unchanged)."""
    mult = hidden / dim
    return mult if int(mult * dim) == hidden else (hidden + 0.5) / dim


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


def run_jobs(jobs: list[tuple[list[list[str]], Path]], parallel: int, threads: int) -> list[Path]:
    """Run jobs `parallel` at a time, each a list of commands run one after the other (the next only
    when the one before it succeeded) under `nice` with `threads` threads, their output in the job's
    log file; returns the logs of the jobs that failed (a command's non-zero exit), in the order
    they ended."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running, failed = list(jobs), [], []

    def start(command: list[str], f) -> subprocess.Popen:
        return subprocess.Popen(["nice", "-n", "5", *command], stdout=f, stderr=subprocess.STDOUT, env=env)

    while pending or running:
        while pending and len(running) < parallel:
            commands, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "a")  # noqa: SIM115 - closed when its job ends; appended: a run's earlier sittings stay
            running.append([start(commands[0], f), f, log, list(commands[1:])])
        time.sleep(1)
        for item in list(running):
            proc, f, log, rest = item
            if proc.poll() is None:
                continue
            if proc.returncode == 0 and rest:
                item[0] = start(rest.pop(0), f)
                continue
            f.close()
            running.remove(item)
            if proc.returncode:
                print(f"job failed ({proc.returncode}): see {log}", file=sys.stderr, flush=True)
                failed.append(log)
    return failed


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
    """Recall of every checkpoint of a run (but the steps in `skip`), oldest first. `exposures`:
    biographies read per person, the run's tokens x `bios_share` (the biographies' share of a
    mixture's tokens; 1 for the biographies alone) over the tokens of one person's biographies."""
    from pkmlm.checkpoint.store import list_checkpoints, step_of
    from pkmlm.metrics.recall import evaluate_recall
    from pkmlm.run import load_run

    times = _train_times(run_dir)
    rows = []
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        if skip and step_of(ckpt) in skip:
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
    return rows


def steps_done(run_dir: Path) -> int:
    """The step of the run's latest complete checkpoint (its metadata written last: where a restarted
    run resumes), 0 for none."""
    from pkmlm.checkpoint.store import list_checkpoints, step_of

    complete = [c for c in list_checkpoints(Path(run_dir) / "checkpoints") if (c / ".metadata").is_file()]
    return step_of(complete[-1]) if complete else 0


def remaining_hours(todo: list[dict], step_ms: dict[str, float]) -> list[float] | None:
    """Hours each plan in `todo` still needs at the sweep's reference step times (its steps from its
    latest complete checkpoint to its `max_steps`); None when an arm has no reference time
    (`--step-time-repeats 0`). A reference time is one job's step at `--threads` threads on a quiet
    machine: a loaded machine takes longer, and the recall evaluations come on top."""
    if any(plan["arm"] not in step_ms for plan in todo):
        return None
    return [max(0, plan["max_steps"] - steps_done(plan["run_dir"])) * step_ms[plan["arm"]] / 3.6e6 for plan in todo]


def _eta(todo: list[dict], step_ms: dict[str, float], jobs: int) -> str:
    return _eta_of((remaining_hours(todo, step_ms) or []) if todo else [], jobs)


def equal_time_shortfalls(plans: list[dict], step_ms: dict[str, float], dense_factor: float) -> list[str]:
    """One line per sparse arm of `plans` whose training time the equal-compute dense arm of its
    corpus (`dense`, `mix_dense`) does not reach at `dense_factor` times its equal-exposure steps, at
    the reference step times: at the arm's equal exposures (no equal-time row for it at all), else at
    its longest point (`--sparse-factor`: no `equal time to <arm> at 2x` row). Each line gives the
    --dense-factor that reaches it, in quarters (the checkpoints')."""
    lines = []
    for arm, plan in sorted({p["arm"]: p for p in plans}.items()):
        dense = dense_arm_of(arm)
        if is_dense(arm) or arm not in step_ms or dense not in step_ms or all(p["arm"] != dense for p in plans):
            continue
        ratio = step_ms[arm] / step_ms[dense]
        longest = plan["max_steps"] / plan["steps_equal"]
        if ratio > dense_factor:
            point, needed = "its equal exposures", ratio
        elif ratio * longest > dense_factor:
            point, needed = f"{longest:g}x its exposures", ratio * longest
        else:
            continue
        quarters = math.ceil(needed * CHECKPOINTS_PER_RUN) / CHECKPOINTS_PER_RUN
        lines.append(
            f"sweep: note: {arm} at {point} trains {needed:.2f}x {dense}'s equal-exposure time, past its "
            f"{dense_factor:g}x: no equal-time row there; --dense-factor {quarters:g} reaches it"
        )
    return lines


def recorded_max_steps(run_dir: Path) -> int | None:
    """The `train.max_steps` the run in `run_dir` was last started with (its `config.yaml`), None
    for a run not started."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    value = OmegaConf.select(OmegaConf.load(path), "train.max_steps")
    return int(value) if value is not None else None


def run_commands(plan: dict) -> list[list[str]]:
    """The commands that bring the plan's run to its `max_steps`. A run stopped part-way resumes
    only under the max_steps it was started with (the LR schedule; pkmlm.train.rundir), so a run
    whose planned max_steps changed since (a --dense-factor or --sparse-factor changed while it was
    training) first finishes at its recorded max_steps, then extends from its last checkpoint where
    the plan wants more (where it wants less, that run passes the planned step's checkpoint)."""
    recorded = recorded_max_steps(plan["run_dir"])
    if recorded is None or recorded == plan["max_steps"] or steps_done(plan["run_dir"]) >= recorded:
        return [plan["command"]]
    finish = [f"train.max_steps={recorded}" if a.startswith("train.max_steps=") else a for a in plan["command"]]
    return [finish, *([plan["command"]] if plan["max_steps"] > recorded else [])]


run_finished = run_archive.finished  # run_finished(plan): trained to its max_steps here, or restored for this plan


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
                args.dense_factor if arm in ("dense", "mix_dense") else 1.0 if is_dense(arm) else args.sparse_factor
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
    kept in `<run>/sweep_recall.jsonl` and only checkpoints not in it are evaluated. Writes
    `<run>/recall.json`, which pkmlm-compare reads: the equal-exposure checkpoint's row (the last
    checkpoint's while the run has not reached it), so that compare's table and figures set every arm
    at equal exposures, although the dense arms run longer."""
    from pkmlm.checkpoint.store import list_checkpoints, step_of

    run_dir = Path(plan["run_dir"])
    cache = run_dir / run_archive.RECALL_CACHE
    rows = {row["step"]: row for row in run_archive.cache_rows(cache)}  # a torn line: evaluated again
    steps = {step_of(p) for p in list_checkpoints(run_dir / "checkpoints")}
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
        run_archive.append_rows(cache, fresh)
        rows.update((row["step"], row) for row in fresh)
    if rows and "decay_from" not in plan:  # what pkmlm-compare shows of the run: its equal-exposure point
        shown = json.dumps(rows.get(plan["steps_equal"], rows[max(rows)]), indent=1) + "\n"
        path = run_dir / "recall.json"
        if not path.is_file() or path.read_text() != shown:  # a finished run's files are left as they are
            path.write_text(shown)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.items() if k not in ("command", "overrides")}
    # exposures from the tokens, here: rows cached before a mixture's share was counted said 2x for 0.5
    per_person = plan["tokens_per_bio"] * plan["people"]
    return [{**meta, **rows[step], "exposures": rows[step]["tokens"] * share / per_person} for step in sorted(rows)]


RETRAINED_CHECK = "retrained_check.json"  # in a restored run trained again here: does it reproduce?


def check_retrained(plan: dict, templates: int) -> str | None:
    """For a run restored from the archive and trained again here for its decayed branches (decay.py,
    `_job`): its recall at its latest checkpoint here against the archived row of that step,
    measured once (`<run>/retrained_check.json`); a line saying whether the two agree (the runs are
    deterministic on one thread; another machine, torch or thread count may not reproduce them, and
    then the branches start from other weights than those behind the run's archived rows). None for
    any other run."""
    from pkmlm.checkpoint.store import list_checkpoints, step_of

    run_dir = Path(plan["run_dir"])
    done = [c for c in list_checkpoints(run_dir / "checkpoints") if (c / ".metadata").is_file()]
    if not done or not run_archive.restored(plan):
        return None
    step = step_of(done[-1])
    archived = {r["step"]: r for r in run_archive.cache_rows(run_dir / run_archive.RECALL_CACHE)}.get(step)
    if archived is None:
        return None
    path = run_dir / RETRAINED_CHECK
    try:
        check = json.loads(path.read_text())
    except (OSError, ValueError):
        check = None
    if not isinstance(check, dict) or check.get("step") != step or not isinstance(check.get("bits"), (int, float)):
        (row,) = evaluate_run(
            run_dir,
            Path(plan["facts"]) / "qa.jsonl",
            plan["tokens_per_bio"],
            plan["people"],
            templates,
            skip={step_of(c) for c in list_checkpoints(run_dir / "checkpoints")} - {step},  # that one only
            bios_share=plan.get("bios_share", 1.0),
        )
        check = {"step": step, "bits": row["recall/bits"], "archived_bits": archived["recall/bits"]}
        path.write_text(json.dumps(check) + "\n")
    same = abs(check["bits"] - archived["recall/bits"]) <= 1e-6 * max(1.0, abs(archived["recall/bits"]))
    verdict = (
        "the archived run reproduced"
        if same
        else "NOT the archived run: its decayed branches start from other weights than its rows' (another "
        "machine, torch or thread count?); retrain it from scratch in a new --out to compare like with like"
    )
    return (
        f"sweep: {run_dir.name}, trained again here: {check['bits']:,.2f} bits at step {step} against "
        f"{archived['recall/bits']:,.2f} archived: {verdict}"
    )


def dense_saturated(results: list[dict], people: int, decayed: bool = False) -> bool:
    """Whether the dense arm at N=`people` is saturated: its mean bits over seeds at twice the
    equal-exposure steps within `SATURATION` of those at the equal-exposure steps (the seeds that
    have both points: `sweep_report.gain_at_2x`); `decayed`: its decayed branches from those points
    (`--decay`: what the runs store once annealed, decay.py)."""
    gain = gain_at_2x(results, people, "dense", decayed=decayed)
    return gain is not None and gain[1] <= (1 + SATURATION) * gain[0]


# one add_argument per option with its help text: a list, not logic to split
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
        default=2.0,
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
    p.add_argument(
        "--decay",
        default="",
        metavar="FACTORS",
        help="comma-separated multiples of the equal-exposure steps (quarters, e.g. 1,2): from each run's "
        "checkpoint there, a branch with the LR decayed to 0 (decay.py), trained after its run, scored and "
        "reported beside the constant-LR points; the dense arm also branches where it meets the sparse "
        "arms' branches in time",
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
    p.add_argument(
        "--archive",
        metavar="FILE",
        default=None,
        help="keep every finished run's recall rows, memory usage and commit (and the step times) in FILE "
        "(JSON lines, a few kB a run), and restore finished runs from it into a --out that lost them "
        "instead of training them again (pkmlm.knowledge.archive)",
    )
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return p.parse_args(argv)


def _refuse_bad_arguments(args: argparse.Namespace) -> None:
    """One line per argument the sweep cannot run with, before anything is written or trained."""
    if args.bios_share is not None and not 0.0 < args.bios_share < 1.0:
        raise SystemExit(f"sweep: --bios-share must be in (0, 1), got {args.bios_share}: e.g. 0.5 for half the tokens")
    if args.sparse_factor < 1.0:
        raise SystemExit(f"sweep: --sparse-factor must be >= 1 (got {args.sparse_factor}): 1 stops at equal exposures")
    if args.until_saturated and args.dense_factor < 2:
        raise SystemExit(
            "sweep: --until-saturated needs --dense-factor >= 2 (the dense arm's bits at 2x the exposures)"
        )


def _evaluate_level(plans: list[dict], branches: dict[Path, list[dict]], templates: int) -> list[dict]:
    """The rows of the level's runs that are here (trained or restored) and of their decayed branches
    (as whole trainings, `decay.total_rows`), each checkpoint evaluated once (`evaluate_cached`); a
    restored run trained again for its branches is checked against its archived rows (`check_retrained`)."""
    results = []
    for plan in plans:
        if (plan["run_dir"] / "checkpoints").is_dir() or run_archive.restored(plan):
            rows = evaluate_cached(plan, templates)
            results.extend(rows)
            note = check_retrained(plan, templates) if branches.get(plan["run_dir"]) else None
            if note:
                print(note, file=sys.stderr, flush=True)
            for branch in branches.get(plan["run_dir"], []):
                if (branch["run_dir"] / "checkpoints").is_dir() or run_archive.restored(branch):
                    results.extend(decay.total_rows(evaluate_cached(branch, templates), rows))
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()  # absolute paths in every command: an archived run's `{out}` (archive.py)
    if args.merge:
        return _merge(args, argv, out)
    _refuse_bad_arguments(args)
    factors = decay.parse_factors(args.decay)  # refused here, before training
    archive = run_archive.read(Path(args.archive)) if args.archive else None  # refused here, before training
    if archive is not None and run_archive.restore_step_times(archive, out):
        print(f"step times restored from {args.archive}", file=sys.stderr, flush=True)
    t0 = time.time()
    levels = sorted((int(n) for n in args.people.split(",")), reverse=True)  # longest first: its tokenizer
    budget = args.max_runs
    results: list[dict[str, Any]] = []
    step_ms = load_step_times(out).get("step_ms", {})
    stopped = False
    failed: list[Path] = []
    all_plans: list[dict] = []
    while levels:
        people = levels.pop(0)
        plans = plan_level(args, out, people)
        all_plans += plans
        if archive is not None:
            _restore_level(archive, plans, people)
        unfinished = [plan for plan in plans if not run_finished(plan)]
        branches = _level_branches(archive, plans, factors, step_ms, people)
        work = [plan for plan in plans if plan in unfinished or _pending(branches, plan)]
        if work and budget != 0:  # every arm's reference step time, once per sweep directory (see step_time.py)
            known = step_ms
            step_ms = reference_step_times(out, plans, args.threads, args.step_time_repeats).get("step_ms", {})
            if factors and step_ms != known:  # the dense arms' equal-time branch points need them
                branches = _level_branches(archive, plans, factors, step_ms, people)
                work = [plan for plan in plans if plan in unfinished or _pending(branches, plan)]
        jobs = [_job(plan, branches) for plan in work]
        todo = work if budget is None else work[:budget]
        if budget is not None:  # stopped: a run left untrained (branches left do not hold the next N back)
            stopped = stopped or any(plan in unfinished for plan in work[len(todo) :])
            budget -= len(todo)
        pending = sum(len(_pending(branches, p)) for p in plans)
        print(
            f"N={people}: {len(plans)} runs, {len(unfinished)} unfinished"
            + (f", {pending} decayed branches unfinished" if factors else "")
            + f"{_eta_of(_job_hours(jobs, step_ms), args.jobs)}, {len(todo)} to train now",
            file=sys.stderr,
            flush=True,
        )
        for line in equal_time_shortfalls(plans, step_ms, args.dense_factor):
            print(line, file=sys.stderr, flush=True)
        for _, _, note in jobs[: len(todo)]:
            if note:
                print(note, file=sys.stderr, flush=True)
        logs = [out / "logs" / f"{plan['run_dir'].name}.log" for plan in todo]
        failed += run_jobs([(commands, log) for (commands, _, _), log in zip(jobs, logs)], args.jobs, args.threads)
        results += _evaluate_level(plans, branches, args.templates)
        all_plans += [b for bs in branches.values() for b in bs]
        if stopped:
            print(f"stopped after --max-runs {args.max_runs}: run the same command again to continue", file=sys.stderr)
            break
        if archive is not None:  # this N's finished runs, with their usage, before the next N trains
            _archive_level(archive, all_plans, results, people, out)
        largest = max(r["people"] for r in results) if results else people
        if args.until_saturated and not levels and not failed:  # a failed run: no larger N on a broken level
            if dense_saturated(results, largest, decayed={1.0, 2.0} <= set(factors)):
                print(f"dense arm saturated at N={largest}", file=sys.stderr, flush=True)
            elif 2 * largest <= args.max_people:
                levels.append(2 * largest)
    results = with_reference_times(results, step_ms)
    with open(out / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    print(report(results, out, f"wall time of this sitting: {time.time() - t0:.0f} s"), flush=True)
    _write_results(args, argv, results)
    if archive is not None:  # after the report: the usage it measured is archived too
        kept = run_archive.write(archive, all_plans, out)
        print(f"archived {kept} finished runs in {args.archive}", file=sys.stderr, flush=True)
    if failed:
        raise SystemExit(
            f"sweep: {len(failed)} training run(s) failed (logs: {', '.join(str(log) for log in failed)}): "
            "fix the cause and run the same command again (finished work is kept)"
        )


def _merge(args: argparse.Namespace, argv: list[str] | None, out: Path) -> None:
    """--merge: the table and figures of earlier sweep directories' results.jsonl together, nothing trained."""
    if args.archive:
        raise SystemExit("sweep: --archive is for a sweep that trains (--merge only reads results.jsonl files)")
    results = [
        json.loads(line)
        for d in args.merge
        for line in (Path(d) / "results.jsonl").read_text().splitlines()
        if line.strip()
    ]
    _refuse_duplicate_runs(results)
    out.mkdir(parents=True, exist_ok=True)
    print(report(results, out, f"merged from {', '.join(args.merge)}"), flush=True)
    _write_results(args, argv, results)


def _level_branches(
    archive: run_archive.Archive | None, plans: list[dict], factors: list[float], step_ms: dict[str, float], people: int
) -> dict[Path, list[dict]]:
    """The level's decayed branches (`decay.plan_branches`; none without `--decay`), the finished ones
    restored from the archive where it holds them."""
    branches = decay.plan_branches(plans, factors, step_ms) if factors else {}
    if archive is not None and branches:
        _restore_level(archive, [b for bs in branches.values() for b in bs], people, "decayed branches")
    return branches


def _pending(branches: dict[Path, list[dict]], plan: dict) -> list[dict]:
    """The plan's decayed branches not finished yet."""
    return [b for b in branches.get(plan["run_dir"], []) if not run_finished(b)]


def with_max_steps(command: list[str], steps: int) -> list[str]:
    """A training command with its `train.max_steps` set to `steps`."""
    return [f"train.max_steps={steps}" if a.startswith("train.max_steps=") else a for a in command]


def _job(plan: dict, branches: dict[Path, list[dict]]) -> tuple[list[list[str]], list[tuple[dict, int]], str | None]:
    """The commands of a plan's job, what each trains (plan, steps to its end) and a note for the
    log where the run is trained again: the run where it is
    unfinished, then its unfinished decayed branches, each after the run's checkpoint it starts from.
    A finished run without those checkpoints (restored from an archive) is trained again first, up
    to its last branch point (its recall rows stay the archived ones)."""
    commands, parts = [], []
    if not run_finished(plan):
        commands += run_commands(plan)
        parts.append((plan, plan["max_steps"]))
    pending = _pending(branches, plan)
    again = decay.retrain_to(plan, pending) if pending and run_finished(plan) else None
    note = None
    if again is not None:
        note = (
            f"sweep: {plan['run_dir'].name}: finished without its checkpoints here (restored from the archive): "
            f"trained again to step {again} for its decayed branches"
        )
        retrain = {**plan, "max_steps": again, "command": with_max_steps(plan["command"], again)}
        # nothing to resume (a config.yaml of an attempt that never checkpointed would say the full run)
        commands += run_commands(retrain) if steps_done(plan["run_dir"]) else [retrain["command"]]
        parts.append((retrain, again))
    for branch in pending:
        commands.append(branch["command"])
        parts.append((branch, branch["max_steps"]))
    return commands, parts, note


def _job_hours(jobs: list[tuple], step_ms: dict[str, float]) -> list[float]:
    """Hours each job (`_job`) still needs at the reference step times (each part's steps from its
    latest complete checkpoint to its end); [] when an arm has no reference time."""
    hours = []
    for _, parts, _ in jobs:
        if any(part["arm"] not in step_ms for part, _ in parts):
            return []
        hours.append(sum(max(0, end - steps_done(p["run_dir"])) * step_ms[p["arm"]] / 3.6e6 for p, end in parts))
    return hours


def _eta_of(hours: list[float], jobs: int) -> str:
    if not hours:
        return ""
    # At --jobs J the sitting takes at least the total over J and at least its longest job.
    wall = max(sum(hours) / max(1, min(jobs, len(hours))), max(hours))
    return f" (~{sum(hours):.1f} job-hours at the reference step times: ~{wall:.1f} h or more at --jobs {jobs})"


def _restore_level(archive: run_archive.Archive, plans: list[dict], people: int, what: str = "finished runs") -> None:
    """Restore the level's finished runs from the archive (`archive.restore`), saying what it did."""
    back = 0
    for plan in plans:
        done, note = run_archive.restore(archive, plan)
        back += done
        if note:
            print(f"sweep: archive: {note}", file=sys.stderr, flush=True)
    if back:
        print(f"N={people}: {back} {what} restored from {archive.path}", file=sys.stderr, flush=True)


def _archive_level(archive: run_archive.Archive, plans: list[dict], results: list[dict], people: int, out: Path):
    """Archive the finished runs so far, the level's memory usage measured first (the rows the
    report's attribute table reads, `usage_rows`)."""
    for r in usage_rows([r for r in results if r["people"] == people]):
        question_usage(r["run_dir"], r["step"], Path(r["facts"]) / "qa.jsonl")
    run_archive.write(archive, plans, out)


def _refuse_duplicate_runs(results: list[dict]) -> None:
    """The report compares one run per (arm, N, seed): two of them (overlapping sweeps merged) would
    be mixed silently, so they are refused, naming both."""
    seen: dict[tuple, str] = {}
    for r in results:
        key, run_dir = (r["arm"], r["people"], r["seed"], r.get("decay_from")), str(r.get("run_dir", ""))
        if seen.setdefault(key, run_dir) != run_dir:
            raise SystemExit(
                f"sweep: --merge: two runs of arm {key[0]}, N={key[1]}, seed {key[2]}"
                + (f", decayed from step {key[3]}" if key[3] is not None else "")
                + f" ({seen[key]} and {run_dir}): "
                "merge sweep directories that do not overlap"
            )


def _write_results(args: argparse.Namespace, argv: list[str] | None, results: list[dict]) -> None:
    if args.results:
        command = "python -m pkmlm.knowledge.sweep " + " ".join(sys.argv[1:] if argv is None else argv)
        write_results(results, Path(args.results), command, args.threads, "mean over seeds (min-max)")
        print(f"wrote {args.results} and {attribute_results_path(Path(args.results))}", file=sys.stderr)


if __name__ == "__main__":
    main()
