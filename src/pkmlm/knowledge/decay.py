"""Decayed branches of the knowledge sweep's runs (issue 21): what a run stores once its learning
rate is annealed.

Why. The sweep trains every arm at a constant LR after warmup, so that each checkpoint *is* the
shorter run (sweep.py): one run gives the whole bits-vs-exposures curve. A run at a constant LR,
though, keeps its weights in a noise band around what it has learnt, and stores fewer bits than the
same run with its LR annealed: the probe of docs/results/knowledge_decay_probe.json measured +16.7%
for the dense arm at N=800 (39,117 vs 33,514 bits) and much less for the memory arms, so the
constant-LR comparison overstated the memory's lead (10% -> 1.8% at N=800, three seeds). The
warmup-stable-decay recipe (Hägele et al. 2024, arXiv:2405.18392) gives the annealed value of any
checkpoint cheaply: a short branch from it with the LR decayed to 0.

What. A branch starts from a checkpoint's weights (`init_from`: the model only, a fresh AdamW) and
trains `BRANCH_SHARE` of the run's equal-exposure steps more on the same corpus, `BRANCH_WARMUP`
steps of warmup then a cosine to 0 (`optim.min_lr_ratio=0`); its recall is scored on the run's
questions. Branch points (`--decay 1,2`): each run's checkpoints at those multiples of its
equal-exposure steps, where it ran that long (`listed_points`); and, for each equal-compute dense
arm, the checkpoints whose branches end nearest the training time of each sparse arm's branches at
the reference step times (`time_matched_points`): the equal-time comparison, counted with the
branches' steps.

How. A branch is a run of the sweep directory, `DIR/runs/<run>-decay<step>-<steps>/`, planned like a run
(`branch_plan`: the parent's fields, `max_steps` its own steps, `decay_from` the parent's step) so
that it resumes, is evaluated once and is archived (archive.py) as runs are. The sweep trains a run's
branches in the run's job, right after it: a machine reset between sittings loses checkpoints,
and a branch needs its parent's. A parent restored from the archive has no checkpoints: its job
trains it again up to its last branch point first (`retrain_to`; its recall rows stay the
archived ones). A branch's row (`total_rows`) counts the parent's exposures, steps and time up to the
branch point and the branch's own on top: equal exposures and equal time compare whole trainings.
"""

from __future__ import annotations

import math
from pathlib import Path

BRANCH_SHARE = 0.25  # of the equal-exposure steps: 40 exposures at the sweep's 160 (the probe's branches)
# A fresh AdamW's second-moment estimate is an average over ~1/(1 - beta2) steps: its first updates
# are large; 20 warmup steps (the probe's) keep them small. Capped at half a very short branch (tests).
BRANCH_WARMUP = 20
REPLACED = ("train.max_steps=", "checkpoint.interval=", "logging.interval=", "hydra.run.dir=")


def branch_steps(plan: dict) -> int:
    """Steps of a branch of the plan's run: `BRANCH_SHARE` of its equal-exposure steps (at least 1)."""
    return max(1, round(BRANCH_SHARE * plan["steps_equal"]))


def quarter(plan: dict) -> int:
    """The run's checkpoint interval, as its training command sets it (sweep.py: a quarter of its
    equal-exposure steps)."""
    return int(next(a.split("=", 1)[1] for a in plan["command"] if a.startswith("checkpoint.interval=")))


def listed_points(plan: dict, factors: list[float]) -> list[int]:
    """The checkpoint steps at `factors` x the run's equal-exposure steps that the run reaches."""
    every = quarter(plan)
    steps = {round(f * plan["steps_equal"] / every) * every for f in factors}
    return sorted(s for s in steps if 0 < s <= plan["max_steps"])


def branch_time(plan: dict, step: int, step_ms: float) -> float:
    """Reference training time (s) of the parent up to `step` and its branch from there."""
    return (step + branch_steps(plan)) * step_ms / 1e3


def time_matched_points(dense: dict, sparse: list[dict], factors: list[float], step_ms: dict[str, float]) -> list[int]:
    """The dense plan's checkpoint steps whose branch ends nearest the time of each of the `sparse`
    plans' listed branches (`branch_time`), within sweep_report.EQUAL_TIME_TOLERANCE of it; none
    where the dense run ends before it (its last checkpoint's branch: as `sweep_report.equal_time_pick`)
    or where an arm has no reference step time."""
    from pkmlm.knowledge.sweep_report import EQUAL_TIME_TOLERANCE

    if dense["arm"] not in step_ms:
        return []
    every = quarter(dense)
    times = {s: branch_time(dense, s, step_ms[dense["arm"]]) for s in range(every, dense["max_steps"] + 1, every)}
    points = set()
    for plan in sparse:
        if plan["arm"] not in step_ms:
            continue
        for step in listed_points(plan, factors):
            target = branch_time(plan, step, step_ms[plan["arm"]])
            off = {abs(t - target): s for s, t in times.items()}
            # as equal_time_pick: none where the dense run's last branch would end before that time
            if off and max(times.values()) >= target and min(off) <= EQUAL_TIME_TOLERANCE * target:
                points.add(off[min(off)])
    return sorted(points)


def branch_command(parent: dict, run_dir: Path, step: int, steps: int) -> list[str]:
    """The parent's training command from its checkpoint at `step`: its arm, data, tokenizer and seed
    as they are; `init_from` the checkpoint, `steps` steps, cosine to 0, one checkpoint at the end."""
    from pkmlm.checkpoint.store import checkpoint_path

    checkpoint = checkpoint_path(Path(parent["run_dir"]) / "checkpoints", step)
    kept = [arg for arg in parent["command"] if not arg.startswith(REPLACED)]
    return [
        *kept,
        f"init_from={checkpoint}",
        "optim.schedule=cosine",
        f"optim.warmup_steps={min(BRANCH_WARMUP, steps // 2)}",
        "optim.min_lr_ratio=0.0",
        f"train.max_steps={steps}",
        f"checkpoint.interval={steps}",
        f"logging.interval={steps}",
        f"hydra.run.dir={run_dir}",
    ]


def branch_plan(parent: dict, step: int, listed: bool) -> dict:
    """The plan of the parent's branch from its checkpoint at `step` (`listed`: a `--decay` point,
    else only an equal-time point of a dense arm). `max_steps` is the branch's own length (the sweep's
    finished test and the archive read it); `steps_equal` stays the parent's."""
    steps = branch_steps(parent)
    # its length in its name: a branch of another length (BRANCH_SHARE changed) is another run, not
    # this one resumed under a new schedule
    run_dir = Path(parent["run_dir"]).with_name(f"{Path(parent['run_dir']).name}-decay{step}-{steps}")
    return {
        **{k: v for k, v in parent.items() if k not in ("run_dir", "command", "max_steps")},
        "max_steps": steps,
        "run_dir": run_dir,
        "command": branch_command(parent, run_dir, step, steps),
        "decay_from": step,
        "decay_listed": listed,
        "parent": Path(parent["run_dir"]),
    }


def plan_branches(plans: list[dict], factors: list[float], step_ms: dict[str, float]) -> dict[Path, list[dict]]:
    """Per parent run directory, the plans of its branches: the listed points of every run, and the
    time-matched points of each equal-compute dense arm (`dense`, `mix_dense`) against the sparse
    arms of its corpus, N and seed."""
    from pkmlm.knowledge.sweep_report import dense_arm_of, is_dense

    out: dict[Path, list[dict]] = {}
    for plan in plans:
        listed = listed_points(plan, factors)
        timed: list[int] = []
        if plan["arm"] in ("dense", "mix_dense"):
            sparse = [
                p
                for p in plans
                if not is_dense(p["arm"])
                and dense_arm_of(p["arm"]) == plan["arm"]
                and (p["people"], p["seed"]) == (plan["people"], plan["seed"])
            ]
            timed = time_matched_points(plan, sparse, factors, step_ms)
        points = sorted(set(listed) | set(timed))
        out[Path(plan["run_dir"])] = [branch_plan(plan, s, s in listed) for s in points]
    return out


def retrain_to(parent: dict, branches: list[dict]) -> int | None:
    """The step the parent must be trained to again for the unfinished `branches` (those whose
    checkpoint it lacks: a parent restored from an archive has none), None when it has them all."""
    from pkmlm.checkpoint.store import checkpoint_path

    missing = [
        b["decay_from"]
        for b in branches
        if not (checkpoint_path(Path(parent["run_dir"]) / "checkpoints", b["decay_from"]) / ".metadata").is_file()
    ]
    return max(missing) if missing else None


def total_rows(branch_rows: list[dict], parent_rows: list[dict]) -> list[dict]:
    """A branch's rows (`sweep.evaluate_cached`'s, its own steps and tokens) as whole trainings: the
    parent's exposures, tokens, steps and wall time at the branch point added (`branch_step`: the branch's own
    step). Rows whose parent row is missing are left out."""
    by_step = {r["step"]: r for r in parent_rows}
    out = []
    for row in branch_rows:
        parent = by_step.get(row["decay_from"])
        if parent is None:
            continue
        wall = [t for t in (parent.get("train_time_s"), row.get("train_time_s")) if t is not None]
        out.append(
            {
                **row,
                "run_dir": str(row["run_dir"]),
                "parent": str(row["parent"]),
                "branch_step": row["step"],
                "step": row["decay_from"] + row["step"],
                "exposures": parent["exposures"] + row["exposures"],
                "tokens": parent["tokens"] + row["tokens"],
                "train_time_s": sum(wall) if len(wall) == 2 else None,
            }
        )
    return out


def parse_factors(text: str) -> list[float]:
    """`--decay`'s comma-separated multiples of the equal-exposure steps, each a positive number of
    quarters (the runs' checkpoints); refused otherwise, naming the value."""
    factors = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value) and float(round(4 * value)) == 4 * value):
            raise SystemExit(
                f"sweep: --decay {item!r}: give multiples of the equal-exposure steps in quarters (e.g. 1,2 or 0.75)"
            )
        factors.append(value)
    return factors
