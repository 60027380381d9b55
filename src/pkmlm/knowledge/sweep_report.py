"""The knowledge sweep's report (sweep.py runs the sweep; this module reads its rows): the points
compared (`points`: every arm at its equal-exposure step and at twice it, each dense arm at each
sparse arm's training time), the tables (`mean_table`: mean over seeds with the min-max spread;
`summary_table`: one seed a row), where the bits go (`attribute_rows`: each attribute's share of
its bits, and how each product-key memory is read while answering the questions, `question_usage`),
the results files (`write_results`) and the figures (`report`).

A row is one checkpoint of one run, as `sweep.evaluate_cached` returns it: the plan's fields (`arm`,
`people`, `seed`, `run_dir`, `facts`, `steps_equal`, ...), the checkpoint's `step`, `tokens`,
`exposures`, `train_time_s`, the recall metrics (`recall/*`) and, once the sweep has its reference
step times, `ref_time_s`. A decayed branch's row (decay.py, `--decay`) has `decay_from` (the
parent's step it branched from) and counts the whole training (`decay.total_rows`): the constant-LR
points and tests read the runs' own rows (`constant_rows`), the decayed points the branches'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pkmlm.knowledge.facts import ATTRIBUTES


def final_checkpoint(run_dir: Path, max_steps: int) -> Path:
    from pkmlm.checkpoint.store import checkpoint_path

    return checkpoint_path(Path(run_dir) / "checkpoints", max_steps)


def is_branch(row: dict) -> bool:
    """Whether the row is a decayed branch's (decay.py) rather than a checkpoint of a run at its constant LR."""
    return row.get("decay_from") is not None


def constant_rows(results: list[dict]) -> list[dict]:
    """The rows of the runs themselves (constant LR), without their decayed branches'."""
    return [r for r in results if not is_branch(r)]


def decay_factor(row: dict) -> float:
    """The multiple of its equal-exposure steps a branch row's parent had trained when it branched."""
    return row["decay_from"] / row["steps_equal"]


def time_key(rows: list[dict]) -> str | None:
    """The training time the rows are compared by: the reference time (`ref_time_s`: steps x the
    arm's step time measured with all arms in turns, step_time.py) when every row has one, else the
    runs' wall-clock time (`train_time_s`, which the machine's load at training time moves too)."""
    for key in ("ref_time_s", "train_time_s"):
        if rows and all(r.get(key) for r in rows):
            return key
    return None


# How far from the memory row's training time a dense checkpoint may be and still be its equal-time
# point. The dense arms checkpoint every quarter of their equal-exposure steps, so where the dense
# run covers the memory's time its nearest checkpoint is within 0.125 / ratio of it (ratio: the
# arms' step-time ratio; <= 9% for every ratio >= 1.39 of the sweep, step_times.json). dense_pm's
# step is 5x the memory arms': their whole training time falls before its first checkpoint, 24-49%
# past it, which is a point at another time, not an equal-time one.
EQUAL_TIME_TOLERANCE = 0.10


def equal_time_pick(mem: dict, dense: list[dict], reach: bool = True) -> dict | None:
    """The dense checkpoint nearest the memory row's training time; None when the dense run stopped
    before that time (its last checkpoint is then only the longest the dense arm ran, not an
    equal-time point; `reach=False`: not asked, for decayed branches, which decay.py plans only
    where the dense run reaches that time), when the nearest is more than `EQUAL_TIME_TOLERANCE`
    away from it, or when the times are not known."""
    key = time_key([mem, *dense])
    if key is None or not dense or (reach and max(r[key] for r in dense) < mem[key]):
        return None
    pick = min(dense, key=lambda r: abs(r[key] - mem[key]))
    return pick if abs(pick[key] - mem[key]) <= EQUAL_TIME_TOLERANCE * mem[key] else None


def _fmt(row: dict | None, key: str, spec: str) -> str:
    return "n/a" if row is None or row.get(key) is None else format(row[key], spec)


def summary_table(results: list[dict]) -> str:
    """Per N and seed, every point of `points` (each arm at equal exposures, each dense arm at each
    sparse arm's training time): `MEAN_COLUMNS` without the seed count, one seed a row."""
    columns = ["N (seed)", *MEAN_COLUMNS[1:3], *MEAN_COLUMNS[4:]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for people, seed in sorted({(r["people"], r["seed"]) for r in results}):
        for row in mean_rows([r for r in results if r["people"] == people and r["seed"] == seed]):
            cells = [f"{people} (seed {seed})", *row[1:3], *row[4:]]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def is_dense(arm: str) -> bool:
    """Dense arms (`dense`, `dense_pm`, `mix_dense`): every other arm (the memory sizes, `engram`,
    any preset by name) holds a sparse table and is compared with them at equal training time."""
    return "dense" in arm


def dense_arm_of(arm: str) -> str:
    """The equal-compute dense arm an arm is compared with: `mix_dense` for the mixture's arms (same
    corpus, `same_data`), `dense` for the others."""
    return "mix_dense" if arm.startswith("mix_") else "dense"


def same_data(arm: str, other: str) -> bool:
    """Whether two arms train on the same corpus: the mixture arms (`mix_*`, biographies diluted in
    web text) only with each other."""
    return arm.startswith("mix_") == other.startswith("mix_")


def points(results: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """Per (N, label): one row per seed. Every arm at its equal-exposure step and, where it ran that
    long, at twice it; each dense arm also at the training time of each sparse arm's equal-exposure
    point and of its 2x point (`... at 2x`; the dense checkpoint nearest that time, when it ran that long).
    Decayed branches (`decayed_points`) beside them."""
    out: dict[tuple[int, str], list[dict]] = {}
    for people, seed in sorted({(r["people"], r["seed"]) for r in results}):
        rows = [r for r in results if r["people"] == people and r["seed"] == seed and not is_branch(r)]
        equal = {r["arm"]: r for r in rows if r["step"] == r["steps_equal"]}
        for arm, r in sorted(equal.items()):
            out.setdefault((people, f"{arm} (equal exposures)"), []).append(r)
        double = {r["arm"]: r for r in rows if r["step"] == 2 * r["steps_equal"]}
        for arm, r in sorted(double.items()):  # where an arm ran that long: its bits at 2x (saturation)
            out.setdefault((people, f"{arm} (2x exposures)"), []).append(r)
        for suffix, sparse in (("", equal), (" at 2x", double)):  # dense at each sparse point's time
            for mem_arm, m in sorted(sparse.items()):
                if is_dense(mem_arm):
                    continue
                dense_arms = {r["arm"] for r in rows if is_dense(r["arm"]) and same_data(r["arm"], mem_arm)}
                for dense_arm in sorted(dense_arms):
                    pick = equal_time_pick(m, [r for r in rows if r["arm"] == dense_arm])
                    if pick is not None:
                        label = f"{dense_arm} (equal time to {mem_arm}{suffix})"
                        out.setdefault((people, label), []).append(pick)
    for key, rows in decayed_points(results).items():
        out.setdefault(key, []).extend(rows)
    return out


def decayed_points(results: list[dict]) -> dict[tuple[int, str], list[dict]]:
    """Per (N, label), one row per seed: every arm's branch from each `--decay` point (`arm (decayed
    from Fx)`), and each dense arm's branch nearest in training time to each sparse arm's (`dense
    (decayed, equal time to ARM decayed from Fx)`: `equal_time_pick` among the dense arm's branches,
    its steps and the branch's counted)."""
    out: dict[tuple[int, str], list[dict]] = {}
    for people, seed in sorted({(r["people"], r["seed"]) for r in results if is_branch(r)}):
        rows = [r for r in results if r["people"] == people and r["seed"] == seed and is_branch(r)]
        listed = sorted((r for r in rows if r.get("decay_listed", True)), key=lambda r: (r["arm"], r["decay_from"]))
        for r in listed:
            out.setdefault((people, f"{r['arm']} (decayed from {decay_factor(r):g}x)"), []).append(r)
        for m in listed:
            if is_dense(m["arm"]):
                continue
            for dense_arm in sorted({r["arm"] for r in rows if is_dense(r["arm"]) and same_data(r["arm"], m["arm"])}):
                pick = equal_time_pick(m, [r for r in rows if r["arm"] == dense_arm], reach=False)
                if pick is not None:
                    label = f"{dense_arm} (decayed, equal time to {m['arm']} decayed from {decay_factor(m):g}x)"
                    out.setdefault((people, label), []).append(pick)
    return out


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
    """Per N and point (see `points`): the number of seeds, and each metric's mean over seeds with
    its spread (min-max) in brackets, in the order of `MEAN_COLUMNS`. Table params: a memory's value
    tables and Engram's hashed tables (`recall/params/memory_values`); n/a for a dense arm."""
    out = []
    for (people, label), rows in sorted(points(results).items()):
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
    from pkmlm.knowledge.archive import append_rows, cache_rows

    for row in cache_rows(cache):
        if row["step"] == step and row.get("qa") == str(qa) and isinstance(row.get("usage"), dict):
            return dict(row["usage"])
    checkpoint = final_checkpoint(run_dir, step)
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
        append_rows(cache, [{"step": step, "qa": str(qa), "usage": usage}])
    except OSError:
        pass  # a read-only run directory (another machine's sweep): reported, measured again next time
    return usage


def usage_rows(rows: list[dict]) -> list[dict]:
    """The rows whose memory usage the attribute table shows (`question_usage`): the sparse arms'
    equal-exposure checkpoints, where the run and its questions are named (the sweep measures them
    before it archives a level, the report reads them)."""
    return [
        r
        for r in constant_rows(rows)
        if r["step"] == r["steps_equal"] and not is_dense(r["arm"]) and r.get("run_dir") and r.get("facts")
    ]


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
    """Per N and point (see `points`): each attribute's bits stored as a share of the bits it
    holds (N x log2 of its values), and for product-key memory arms at equal exposures how their
    table is read while answering the questions (`question_usage`), mean over seeds (min-max), in
    `ATTRIBUTE_COLUMNS` order."""
    out = []
    meta: dict[str, dict[str, float] | None] = {}
    for (people, label), rows in sorted(points(results).items()):
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
        usages = [question_usage(r["run_dir"], r["step"], Path(r["facts"]) / "qa.jsonl") for r in usage_rows(rows)]
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
    """The git commits the rows' runs were trained at (each run's last checkpoint's `code_version`, and
    its archive marker's for a run restored from a sweep archive; `+dirty` for a tree with
    uncommitted changes), short, sorted, comma-separated; `unknown` for a run whose checkpoints are
    not here (a merged sweep from another machine)."""
    from pkmlm.knowledge.archive import code_versions_of

    commits = set()
    for run_dir in sorted({r.get("run_dir", "") for r in results}):
        versions = code_versions_of(Path(run_dir)) if run_dir else []
        if not versions:
            commits.add("unknown")
        for version in versions:
            commits.add(str(version["commit"])[:7] + ("+dirty" if version.get("dirty") else ""))
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
        "note": "; ".join([note, *saturation_lines(results), trained]),
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
    for (people, label), rows in sorted(points(results).items()):
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


SATURATION = 0.05  # the dense arm is saturated when 2x the exposures adds less than 5% bits (issue 21)


def gain_at_2x(results: list[dict], people: int, arm: str, decayed: bool = False) -> tuple[float, float, int] | None:
    """The arm's mean bits over seeds at its equal-exposure step and at twice it, and the number of
    seeds, over the seeds that have both points (a seed still training is left out of both); None
    where no seed has both. `decayed`: its branches from those two points instead (decay.py)."""
    rows = [r for r in results if r["arm"] == arm and r["people"] == people and is_branch(r) == decayed]
    at = "decay_from" if decayed else "step"
    one = {r["seed"]: r["recall/bits"] for r in rows if r[at] == r["steps_equal"]}
    two = {r["seed"]: r["recall/bits"] for r in rows if r[at] == 2 * r["steps_equal"]}
    seeds = sorted(set(one) & set(two))
    if not seeds:
        return None
    return sum(one[s] for s in seeds) / len(seeds), sum(two[s] for s in seeds) / len(seeds), len(seeds)


HALF_TOLERANCE = 0.01  # a checkpoint within 1% of half the last step stands for it (0.5% of the exposures)


def gain_over_last_doubling(results: list[dict], people: int, arm: str) -> tuple[float, float, float, int] | None:
    """The saturation test on the far end of the arm's curve: mean bits over seeds at half its
    last step and at its last step, the exposures at the last step (mean), and the number of
    seeds, over the finished seeds (last checkpoint at `max_steps`) with a checkpoint at half of it;
    None where no seed has both, or where half the last step is not past the equal-exposure step
    (then `gain_at_2x` is the same test or an earlier one). Why a second test: the issue's (2x
    against 1x at `--exposures`) asks whether dense has stopped gaining; where 1x is still on its
    rise (N=800 at 160 exposures) it says "not yet", and only the run's later checkpoints (dense
    to 3.5x: `--dense-factor`) can say whether it stops."""
    rows = [r for r in constant_rows(results) if r["arm"] == arm and r["people"] == people and "max_steps" in r]
    last = {r["seed"]: r for r in rows if r["step"] == r["max_steps"]}
    half = {}  # the checkpoint nearest half the last step (max_steps is rounded: 5,448 = 3.5 x 1,556 + 2)
    for seed, end in last.items():
        off = {abs(2 * r["step"] - end["step"]): r for r in rows if r["seed"] == seed}
        if min(off) <= HALF_TOLERANCE * end["step"]:
            half[seed] = off[min(off)]
    seeds = sorted(s for s in half if half[s]["step"] > half[s]["steps_equal"])
    if not seeds:
        return None
    one, two = (sum(d[s]["recall/bits"] for s in seeds) / len(seeds) for d in (half, last))
    return one, two, sum(last[s]["exposures"] for s in seeds) / len(seeds), len(seeds)


def _gain(one: float, two: float) -> str:
    """`two` over `one` as a signed percentage; "from 0" where `one` is 0 (a run that stored nothing yet)."""
    return f"{two / one - 1:+.1%}" if one else "from 0"


def saturation_lines(results: list[dict]) -> list[str]:
    """Per N and arm that ran to twice its exposures: its bits at 1x and 2x (mean over the seeds with
    both) and the gain; for `dense`, whether it passes the saturation test (`SATURATION`), then the
    same test on the far end of its curve where it ran past 2x (`gain_over_last_doubling`)."""

    def verdict(one: float, two: float) -> str:
        return ": saturated" if two <= (1 + SATURATION) * one else f": not saturated (the test: < +{SATURATION:.0%})"

    lines = []
    for people, arm in sorted({(r["people"], r["arm"]) for r in results}):
        gain = gain_at_2x(results, people, arm)
        if gain is not None:
            one, two, seeds = gain
            lines.append(
                f"N={people} {arm}: {one:,.0f} -> {two:,.0f} bits from 1x to 2x the exposures "
                f"({_gain(one, two)}, {seeds} seed{'s' * (seeds != 1)}){verdict(one, two) if arm == 'dense' else ''}"
            )
        gain = gain_at_2x(results, people, arm, decayed=True)
        if gain is not None:
            one, two, seeds = gain
            lines.append(
                f"N={people} {arm}, decayed branches: {one:,.0f} -> {two:,.0f} bits from 1x to 2x the exposures "
                f"({_gain(one, two)}, {seeds} seed{'s' * (seeds != 1)}){verdict(one, two) if arm == 'dense' else ''}"
            )
        far = gain_over_last_doubling(results, people, arm) if arm == "dense" else None
        if far is not None:
            one, two, exposures, seeds = far
            lines.append(
                f"N={people} {arm}, its curve's last doubling: {one:,.0f} -> {two:,.0f} bits from "
                f"{exposures / 2:.0f} to {exposures:.0f} exposures ({_gain(one, two)}, "
                f"{seeds} seed{'s' * (seeds != 1)}){verdict(one, two)}"
            )
    return lines


TWICE = "equal time, 2x"  # payoff_ratios' third panel: the sparse arm at twice its exposures


def payoff_ratios(results: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """Where each arm pays off against the dense arm of its corpus (`dense`, `mix_dense`): per panel
    (`equal exposures`, `equal time`, `equal time, 2x`), arm and N, one ratio per seed: the arm's
    bits at its equal exposures over the dense arm's at its own equal exposures (every arm but the
    dense one), or over the dense arm's at the arm's training time (`equal_time_pick`; sparse arms
    only); and the sparse arm's bits at twice its exposures over the dense arm's at that training
    time (`--sparse-factor 2` with the dense arm run that long: where the memory's own curve ends)."""
    by_seed = {
        (people, label, r["seed"]): r["recall/bits"] for (people, label), rows in points(results).items() for r in rows
    }
    ratios: dict[str, dict[str, dict[int, list[float]]]] = {"equal exposures": {}, "equal time": {}, TWICE: {}}
    for (people, label, seed), bits in sorted(by_seed.items()):
        if not label.endswith(" (equal exposures)"):
            continue
        arm = label[: -len(" (equal exposures)")]
        dense = dense_arm_of(arm)
        if arm == dense:
            continue
        against = {
            "equal exposures": by_seed.get((people, f"{dense} (equal exposures)", seed)),
            "equal time": None if is_dense(arm) else by_seed.get((people, f"{dense} (equal time to {arm})", seed)),
        }
        for panel, base in against.items():
            if base:
                ratios[panel].setdefault(arm, {}).setdefault(people, []).append(bits / base)
        two = by_seed.get((people, f"{arm} (2x exposures)", seed))
        base = None if is_dense(arm) else by_seed.get((people, f"{dense} (equal time to {arm} at 2x)", seed))
        if two is not None and base:
            ratios[TWICE].setdefault(arm, {}).setdefault(people, []).append(two / base)
    return ratios


def decayed_payoff_ratios(results: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """`payoff_ratios` on the decayed branches (`decayed_points`): per `--decay` point F, each arm's
    branch from Fx over the dense arm's branch from Fx (panel `equal exposures, decayed from Fx`), and
    each sparse arm's over the dense arm's branch nearest its training time (`equal time, decayed from
    Fx`); panels in the order of F."""
    by_seed = {
        (people, label, r["seed"]): r["recall/bits"]
        for (people, label), rows in decayed_points(results).items()
        for r in rows
    }
    ratios: dict[str, dict[str, dict[int, list[float]]]] = {}
    keys = sorted(by_seed, key=lambda k: (float(k[1].rsplit(" ", 1)[1].rstrip("x)")), k))  # by F
    for people, label, seed in keys:
        if " (decayed from " not in label:
            continue
        arm, factor = label.split(" (decayed from ")
        factor = factor.rstrip(")")  # e.g. "2x"
        dense = dense_arm_of(arm)
        if arm == dense:
            continue
        against = {
            f"equal exposures, decayed from {factor}": by_seed.get((people, f"{dense} (decayed from {factor})", seed)),
            f"equal time, decayed from {factor}": None
            if is_dense(arm)
            else by_seed.get((people, f"{dense} (decayed, equal time to {arm} decayed from {factor})", seed)),
        }
        for panel, base in against.items():
            ratios.setdefault(panel, {})
            if base:
                ratios[panel].setdefault(arm, {}).setdefault(people, []).append(by_seed[(people, label, seed)] / base)
    return ratios


def payoff_plot(results: list[dict], path: Path, decayed: bool = False) -> bool:
    """`payoff_ratios` (`decayed`: `decayed_payoff_ratios`) drawn against N, one line per arm, the
    mean over seeds with the spread (min-max) as bars and 1 (the dense arm) as a grey line; False
    (nothing written) when there is no ratio to draw."""
    ratios = decayed_payoff_ratios(results) if decayed else payoff_ratios(results)
    if not any(ratios.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({arm for panel in ratios.values() for arm in panel})
    colours = {arm: matplotlib.colormaps["tab10"](i % 10) for i, arm in enumerate(arms)}
    titles = {TWICE: "at equal time, the arm at 2x its exposures"}
    panels = {panel: by_arm for panel, by_arm in ratios.items() if by_arm}  # no empty panel
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (panel, by_arm) in zip(axes[0], panels.items()):
        for arm, by_n in sorted(by_arm.items()):
            xs = sorted(by_n)
            means = [sum(by_n[n]) / len(by_n[n]) for n in xs]
            err = [[m - min(by_n[n]) for m, n in zip(means, xs)], [max(by_n[n]) - m for m, n in zip(means, xs)]]
            dodge = 1 + 0.04 * (arms.index(arm) - (len(arms) - 1) / 2)  # arms side by side at each N
            ax.errorbar([x * dodge for x in xs], means, yerr=err, marker="o", capsize=3, color=colours[arm], label=arm)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        every_n = sorted({n for by_n in by_arm.values() for n in by_n})
        ax.set_xticks(every_n, [f"{n:,}" for n in every_n])
        ax.minorticks_off()
        ax.set_xlim(min(every_n) / 1.5, max(every_n) * 1.5)
        ax.set_xlabel("people N")
        ax.set_title(titles.get(panel, f"at {panel}"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("bits stored / dense's (mean, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(results: list[dict], out: Path, note: str) -> str:
    """`out/table.md` (the summary table and `note`), `out/bits_vs_exposures.png`,
    `out/bits_vs_people.png`, `out/bits_vs_parameters.png`, `out/bits_vs_people_mean.png` and
    `out/payoff_vs_people.png` (each arm's bits over the dense arm's, at equal exposures, at equal
    time, and at equal time with the sparse arm at 2x: `payoff_ratios`) and, where the sweep has
    decayed branches, `out/payoff_decayed_vs_people.png` (`decayed_payoff_ratios`) for the sweep's
    rows; returns the table."""
    table = mean_table(results)
    table += "".join(f"\n{line}" for line in ["Twice the exposures:", *saturation_lines(results)]) + "\n"
    table += "\nPer seed:\n\n" + summary_table(results)
    table += "\nWhere the bits go (" + ATTRIBUTE_NOTE + "):\n\n" + attribute_table(results)
    if results:
        mean_plot(results, out / "bits_vs_people_mean.png")
        payoff_plot(results, out / "payoff_vs_people.png")
        payoff_plot(results, out / "payoff_decayed_vs_people.png", decayed=True)
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
    line, a 10-colour cycle gave two arms one colour past 10 runs. Decayed branches (decay.py) are
    stars of their run's colour at their whole training's exposures and time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pkmlm.experiments.report import save_bits_figure

    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    styles = line_styles(results)
    for key, style in styles.items():
        mine = [r for r in results if (r["arm"], r["people"], r["seed"]) == key]
        rows = sorted(constant_rows(mine), key=lambda r: r["step"])
        branches = [r for r in mine if is_branch(r)]
        label = style.pop("label")
        time = time_key(rows + branches) or "train_time_s"
        ax_e.plot([r["exposures"] for r in rows], [r["recall/bits"] for r in rows], label=label, **style)
        ax_t.plot([r.get(time) for r in rows], [r["recall/bits"] for r in rows], label=label, **style)
        star = {**style, "marker": "*", "markersize": 9, "linestyle": "none"}  # decayed branches: points, no line
        ax_e.plot([r["exposures"] for r in branches], [r["recall/bits"] for r in branches], **star)
        ax_t.plot([r.get(time) for r in branches], [r["recall/bits"] for r in branches], **star)
    if any(is_branch(r) for r in results):
        ax_e.plot([], [], color="black", marker="*", markersize=9, linestyle="none", label="decayed branch")
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
        for r in constant_rows(results)
        if r["step"] == r["steps_equal"]
    ]
    return knowledge_plot(runs, path, parameters_path)
