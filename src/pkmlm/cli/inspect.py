"""`pkmlm-inspect RUN [DATA ...] --out DIR`: what a trained model's memory layers read.

Writes `DIR/report.md` with one `DIR/layer{i}.md` per memory layer (read histogram, dead slots,
per-head usage/KL/Gini, the contexts that read the most-read slots and a random sample of slots,
usage/KL over the run's checkpoints) and `DIR/summary.json`. A side layer (e.g. Engram's hashed
n-gram tables) gets a section of report.md: its usage statistics and what it says of its reads
(for Engram: the collision rate per order and the `--top` most-read rows with the n-grams that
hash to them). Reads the same data as pkmlm-eval,
through its code: DATA files (any format training reads), `--prepared DIR`, or without either the
run's own validation split. Nothing is written into RUN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pkmlm.cli._common import ArgumentParser, fail
from pkmlm.errors import ConfigError, UserError

USAGE = "pkmlm-inspect RUN [DATA ...] --out DIR [--prepared DIR] [options: see pkmlm-inspect --help]"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="pkmlm-inspect", usage=USAGE, description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="run directory (its newest valid checkpoint), checkpoint or export")
    p.add_argument(
        "data",
        nargs="*",
        default=[],
        metavar="DATA",
        help="files or globs to read (default: the run's validation split)",
    )
    p.add_argument("--out", required=True, help="report directory (created)")
    p.add_argument("--prepared", help="a pkmlm-prepare directory: its validation split")
    p.add_argument("--text-field", help="JSON/parquet text field (default: the run's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--max-batches", type=int, help="read at most this many batches (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--top", type=int, default=8, help="most-read slots shown per layer (default 8)")
    p.add_argument("--random", type=int, default=8, help="randomly drawn slots shown per layer (default 8)")
    p.add_argument("--contexts", type=int, default=5, help="contexts shown per slot (default 5)")
    p.add_argument("--window", type=int, default=16, help="tokens shown before the triggering one (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random slot sample")
    p.add_argument(
        "--history-batches", type=int, help="batches read at each earlier checkpoint for the history (default: all)"
    )
    p.add_argument("--no-history", action="store_true", help="skip usage/KL over the run's checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    for name in ("top", "random", "window"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name}", getattr(args, name), "an integer >= 0")
    if args.contexts < 1:
        raise ConfigError("--contexts", args.contexts, "an integer >= 1")
    if args.history_batches is not None and args.history_batches < 1:
        raise ConfigError("--history-batches", args.history_batches, "an integer >= 1 (or leave it out: all)")
    if args.data and args.prepared:
        raise ConfigError(
            "--prepared", args.prepared, "left out when DATA files are given: read files or a prepared directory"
        )
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--out={str(out)!r} cannot hold the report: {e.strerror or e}; choose another directory"
        ) from None


def _progress(enabled: bool, desc: str):
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def checkpoint_history(run_path: Path, batches: list, device, progress: bool) -> list[dict]:
    """Usage and KL per memory layer at every valid checkpoint the run kept, oldest first."""
    from pkmlm.analysis import count_reads
    from pkmlm.checkpoint import list_checkpoints
    from pkmlm.run import load_run

    points = []
    checkpoints = list_checkpoints(run_path / "checkpoints") if run_path.is_dir() else []
    for path in _progress(progress, "checkpoints")(checkpoints):
        try:
            run = load_run(path, device=device)
        except UserError as e:  # damaged or edited: not a point of the history, and the user is told
            print(f"pkmlm-inspect: skipping checkpoint {path.name} in the history: {e}", file=sys.stderr, flush=True)
            continue
        counts = count_reads(run.model, batches, device)
        points.append(
            {
                "step": run.step,
                "checkpoint": str(path),
                "layers": {
                    str(i): {"usage": c.stats["usage"], "kl_weight": c.stats["kl_weight"]} for i, c in counts.items()
                },
            }
        )
        del run
    return points


def inspect_run(args: argparse.Namespace) -> Path:
    from pkmlm.analysis import collect_contexts, count_reads, pick_slots
    from pkmlm.analysis.report import write_report
    from pkmlm.analysis.side import inspect_side_layers
    from pkmlm.cli.eval import (
        EvalAppConfig,
        EvalDataConfig,
        check_eval_config,
        evaluation_batches,
    )
    from pkmlm.run import load_run
    from pkmlm.train.setup import pick_device

    _check(args)
    cfg = EvalAppConfig(
        checkpoint=args.run,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=args.device,
        data=EvalDataConfig(
            files=list(args.data), prepared=args.prepared, text_field=args.text_field, seq_len=args.seq_len
        ),
    )
    check_eval_config(cfg)
    device = pick_device(args.device)
    run = load_run(args.run, device=device)
    if not run.model.memory_layers() and not run.model.side_layers():
        raise UserError(f"{args.run!r}: its model has no memory layers (model.memory.layers=[]); nothing to inspect")
    files, batches = evaluation_batches(cfg, run)
    if not batches:
        raise UserError(f"no text to read in {files or 'the run validation split'}: give DATA files or --prepared")
    progress = not args.no_progress
    counts = count_reads(run.model, batches, device, progress=_progress(progress, "counting reads"))
    picks = {i: pick_slots(c.count, args.top, args.random, seed=args.seed) for i, c in counts.items()}
    contexts = collect_contexts(
        run.model,
        batches,
        {i: most + drawn for i, (most, drawn) in picks.items()},
        args.contexts,
        device,
        reads={i: c.count for i, c in counts.items()},
        progress=_progress(progress, "finding contexts"),
    )
    side = inspect_side_layers(run.model, batches, device, run.tokenizer, args.top)
    history = []
    if not args.no_history and run.model.memory_layers():
        history = checkpoint_history(Path(args.run).expanduser(), batches[: args.history_batches], device, progress)
    source = {
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "files": files,
        "tokens": sum(int(b[:, 1:].numel()) for b in batches),
        "batches": len(batches),
    }
    return write_report(
        Path(args.out),
        source=source,
        counts=counts,
        contexts=contexts,
        n_most={i: len(most) for i, (most, _) in picks.items()},
        side=side,
        history=history,
        batches=batches,
        tokenizer=run.tokenizer,
        window=args.window,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        report = inspect_run(args)
    except UserError as e:
        fail(str(e))
    print(report, flush=True)


if __name__ == "__main__":
    main()
