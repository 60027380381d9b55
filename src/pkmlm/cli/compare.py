"""`pkmlm-compare DIR [DIR ...] [--out OUT] [--baseline RUN]`: compare runs in one table.

Each DIR is a run directory or a sweep directory (every run below it is taken). Writes into OUT
(default `./compare/`): `table.md` (the table and whether the runs were matched), `table.csv`
(every number, full precision), `ppl_vs_tokens.png`, `ppl_vs_time.png` and, for a memory-position
sweep, `by_layer.png`; for runs of two or more memory variants, `variants.md` (each run's variant,
parameters total / active, FLOPs per token, usage, KL, balance loss) and `variants.png`; prints the
markdown. A plain CLI (argparse), not a Hydra app.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from pkmlm.cli._common import ArgumentParser, fail
from pkmlm.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pkmlm-compare",
        usage="pkmlm-compare DIR [DIR ...] [--out OUT] [--baseline RUN]",
        description="Compare pkmlm runs: parameters, tokens, time, speed, MFU, perplexity and memory usage.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories or sweep directories")
    parser.add_argument(
        "--out", default="compare", help="where to write table.md, table.csv and the plots (default: ./compare/)"
    )
    parser.add_argument(
        "--baseline",
        default="0",
        help="the run the ratio columns divide by: its "
        "label as shown in the table, or its 0-based row number (default: 0, the first)",
    )
    return parser


def _baseline_index(value: str, labels: list[str]) -> int:
    if value.isdigit() and int(value) < len(labels):
        return int(value)
    if value in labels:
        return labels.index(value)
    raise UserError(
        f"--baseline={value!r} is neither a row number below {len(labels)} nor a run label "
        f"({', '.join(repr(label) for label in labels)})"
    )


def _warn_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        from pkmlm.experiments.report import write_recall_report, write_report, write_variants_report
        from pkmlm.experiments.runs import load_runs
        from pkmlm.paths import dir_problem

        out = Path(args.out)
        reason = dir_problem(out)
        if reason is not None or (out.exists() and not out.is_dir()):
            raise UserError(f"--out={args.out!r} cannot hold the report: {reason or 'it is a file'}; give a directory")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _warn_one_line  # one line each, naming the file
            runs = load_runs(args.dirs)
            baseline = _baseline_index(args.baseline, [r.label for r in runs])
            result = write_report(runs, out, baseline)
            recall = write_recall_report(runs, out)  # knowledge runs: recall/* table and bits-vs-N plot
            variants = write_variants_report(runs, out, baseline)  # memory variants: variants.md, variants.png
    except UserError as error:
        fail(str(error))
    print(result["markdown"], end="")
    if recall["markdown"]:
        print("\n" + recall["markdown"])
    if variants["markdown"]:
        print("\n" + variants["markdown"])
    print("wrote " + ", ".join(str(p) for p in result["files"] + recall["files"] + variants["files"]), file=sys.stderr)


if __name__ == "__main__":
    main()
