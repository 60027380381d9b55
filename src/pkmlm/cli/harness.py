"""`pkmlm-harness RUN --tasks T1,T2 [--include-path DIR] [--limit N] [--num-fewshot K]
[--batch-size B] [--device D] [--output FILE]`: evaluate a run with EleutherAI's
lm-evaluation-harness (lm-eval 0.4) through `pkmlm.harness.PkmlmLM`.

Prints lm-eval's results table and writes its results JSON to FILE (default
`harness_results.json`). Tasks are lm-eval's (Hub datasets: needs the Hub) or your own YAMLs under
`--include-path` (local JSON files work offline). A plain CLI (argparse), not a Hydra app.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pkmlm.cli._common import ArgumentParser, fail
from pkmlm.config import DEVICES, check_device
from pkmlm.errors import ConfigError, UserError

USAGE = (
    "pkmlm-harness RUN --tasks T1,T2 [--include-path DIR] [--limit N] [--num-fewshot K] "
    "[--batch-size B] [--device D] [--output FILE]"
)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="pkmlm-harness", usage=USAGE, description="Evaluate a pkmlm run with lm-evaluation-harness."
    )
    p.add_argument(
        "run", metavar="RUN", help="a run directory (newest valid checkpoint), checkpoint or export directory"
    )
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,piqa")
    p.add_argument("--include-path", default=None, help="a directory of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default 16)")
    p.add_argument("--device", default="cpu", help=f"{DEVICES}, as train.device (default cpu)")
    p.add_argument("--output", default="harness_results.json", help="where to write the results JSON")
    return p


def _check(args: argparse.Namespace) -> tuple[list[str], str]:
    """The task names and the device (`auto` resolved), or a one-line `UserError`."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks={args.tasks!r}: give one or more task names, comma-separated")
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise UserError(f"--limit={args.limit}: give a positive number of documents (or a fraction < 1)")
    if args.limit is not None and args.limit >= 1 and args.limit != int(args.limit):
        raise UserError(f"--limit={args.limit}: a number of documents is a whole number (or a fraction < 1)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot={args.num_fewshot}: give an integer >= 0")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size}: give an integer >= 1")
    from pkmlm.train.setup import pick_device

    try:  # the checks of train.device and pkmlm-eval's device, under this tool's own flag
        check_device("--device", args.device)
        device = str(pick_device(args.device))
    except ConfigError as e:
        raise UserError(f"--device={args.device!r}: {e.allowed}") from None
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path={args.include_path!r}: no such directory (it holds task YAMLs)")
    if not Path(args.run).exists():
        raise UserError(f"RUN={args.run!r}: no such run, checkpoint or export directory")
    output = Path(args.output)
    if output.is_dir() or not output.parent.resolve().is_dir():
        raise UserError(f"--output={args.output!r}: give a file path in an existing directory")
    return tasks, device


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        tasks, device = _check(args)
        from lm_eval.utils import handle_non_serializable, make_table

        from pkmlm.harness import run_harness

        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = run_harness(
            args.run,
            tasks,
            include_path=args.include_path,
            limit=limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            device=device,
        )
    except UserError as error:
        fail(str(error))
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
