"""Record training runs' validation numbers as a results file (docs/results/<name>.json, issue 20).

    python scripts/record_run.py RUN_DIR [RUN_DIR ...] --name default_run --command "make train" \
        --load "quiet (load average 0.1-2.0)" [--label "seed 1337"]...

One row per evaluation of each run (step, validation perplexity and loss, each memory layer's usage
and KL weight / count), then the run's wall and training time. The commit is the one the run's
newest checkpoint recorded (`code_version`); a run made from a tree with uncommitted changes is
refused when those changes touch the training code (src/, configs/, data/, pyproject.toml), because
its numbers then belong to no commit; runs recorded before checkpoints listed the changed paths are
refused whenever the tree was dirty. The machine, torch and thread count are this
process's: run it on the machine that trained.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import benchlib
import torch

ROOT = Path(__file__).resolve().parents[1]
# What `make train` runs: uncommitted changes anywhere else (docs, tests) leave a run's numbers those of its commit.
TRAINING_PATHS = ("src/", "configs/", "data/", "pyproject.toml")


def machine() -> str:
    """The CPU in words, with its core count and the ATen kernels torch picked (what reproducibility depends on)."""
    return f"{benchlib.cpu_name()}, {torch.backends.cpu.get_cpu_capability()} kernels"


def run_numbers(run_dir: Path, dirty_ok: str = "") -> tuple[list[dict], dict, str]:
    """The run's evaluation rows, its last row and the commit its newest checkpoint names."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*.dcp"))
    if not checkpoints:
        sys.exit(f"record_run: {run_dir} has no checkpoint, so no recorded commit; record a finished run")
    version = json.loads((checkpoints[-1] / "meta.json").read_text()).get("code_version") or {}
    if not version.get("commit"):
        sys.exit(f"record_run: {checkpoints[-1]} records no git commit; train from a git checkout")
    if version.get("dirty"):
        paths = version.get("dirty_paths")
        training = [p for p in paths or [] if p.startswith(TRAINING_PATHS)]
        if (paths is None and not dirty_ok) or training or len(paths or []) >= 50:
            sys.exit(
                f"record_run: {run_dir} was trained from a tree with uncommitted changes"
                f"{' to ' + ', '.join(training[:5]) if training else ''}; commit, then train again"
            )
    return [r for r in rows if "val/ppl" in r], rows[-1], version["commit"][:7]


def same_code(commits: list[str]) -> str:
    """The newest of `commits` when they all hold the same training code (src/, configs/, data/,
    pyproject.toml: what `make train` runs); runs from trees that differ there go in separate files."""
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    # src/pkmlm/results.py renders documents and is imported by nothing that trains.
    paths = [*TRAINING_PATHS, ":(exclude)src/pkmlm/results.py"]
    newest = commits[0]
    for other in commits[1:]:
        if git("diff", "--quiet", newest, other, "--", *paths).returncode != 0:
            sys.exit(f"record_run: runs trained at {newest} and {other}, whose code differs; one file per commit")
        if git("merge-base", "--is-ancestor", newest, other).returncode == 0:
            newest = other
    return newest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--name", required=True, help="docs/results/<name>.json")
    parser.add_argument("--command", required=True, help="the command that trained the runs, exactly")
    parser.add_argument("--load", required=True, help="what else ran on the machine (uptime's load average)")
    parser.add_argument("--label", action="append", default=None, help="one per run: the first column")
    parser.add_argument("--note", default="")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument(
        "--dirty-ok",
        default="",
        metavar="WHY",
        help="record runs whose checkpoints predate the list of changed paths although the tree was dirty; "
        "WHY (which files were changed) goes into the rendered note",
    )
    args = parser.parse_args(argv)
    labels = args.label or [str(r) for r in args.runs]
    if len(labels) != len(args.runs):
        sys.exit("record_run: give one --label per run directory")
    table, commits, extra = [], set(), {}
    layers = None
    for label, run_dir in zip(labels, args.runs):
        evals, last, commit = run_numbers(run_dir, args.dirty_ok)
        commits.add(commit)
        layers = layers or sorted(
            {k.split("/")[1] for r in evals for k in r if k.endswith("/usage") and k.count("/") == 2}
        )
        for i, r in enumerate(evals):
            times = (
                [f"{last['wall_time_s'] / 60:.1f} / {last['train_time_s'] / 60:.1f} min"]
                if i == len(evals) - 1
                else [None]
            )
            table.append(
                [label, r["step"], r["val/ppl"], r["val/loss"]]
                + [r.get(f"memory/{layer}/usage") for layer in layers]
                + [[r.get(f"memory/{layer}/kl_weight"), r.get(f"memory/{layer}/kl_count")] for layer in layers]
                + times
            )
        extra[label] = {"wall_time_s": last.get("wall_time_s"), "train_time_s": last.get("train_time_s")}
    commit = same_code(sorted(commits))

    columns = ["run", "step", {"name": "val ppl", "format": ".2f"}, {"name": "val loss", "format": ".4f"}]
    columns += [{"name": f"{layer} usage", "format": ".1%"} for layer in layers]
    columns += [{"name": f"{layer} KL weight / count", "format": ".2f"} for layer in layers]
    columns += ["wall / training time"]
    result = {
        "command": args.command,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load": args.load,
        "columns": columns,
        "rows": table,
        "times": extra,
    }
    note = " ".join(
        x for x in (args.note, f"Uncommitted changes when trained: {args.dirty_ok}" if args.dirty_ok else "") if x
    )
    if note:
        result["note"] = note
    out = args.results_dir / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({len(table)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
