"""`pkmlm-facts --people N --seed S --out DIR [--templates T]`: write a synthetic biography corpus.

DIR gets `bios.jsonl` (T biographies per person, each a `text` record: train on it with
`data.files=[DIR/bios.jsonl]`, or mix it with web text through `data.sources` weights),
`qa.jsonl` (one recall question per person and attribute: `pkmlm-eval eval.recall=DIR/qa.jsonl`)
and `meta.json` (attribute cardinalities and the corpus's total information in bits). The same
arguments always write the same files. A plain CLI (argparse), not a Hydra app.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from pkmlm.cli._common import ArgumentParser, fail

USAGE = "pkmlm-facts --people N --seed S --out DIR [--templates T]"


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pkmlm-facts",
        usage=USAGE,
        description="Write a synthetic biography corpus for knowledge-"
        "capacity experiments (bios.jsonl, qa.jsonl, meta.json).",
    )
    parser.add_argument("--people", type=int, required=True, help="number of people N (>= 1)")
    parser.add_argument("--seed", type=int, required=True, help="seed: the same seed writes the same files")
    parser.add_argument("--out", required=True, help="directory to write (created; existing corpus files are replaced)")
    parser.add_argument(
        "--templates",
        type=int,
        default=5,
        help="biographies per person, each in its own phrasings and order (default 5)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.people < 1:
        fail(f"--people={args.people}: give the number of people, an integer >= 1")
    if args.templates < 1:
        fail(f"--templates={args.templates}: give biographies per person, an integer >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out={args.out!r} is a file; give a directory")
    from pkmlm.knowledge.facts import MAX_DOCUMENTS, estimate_corpus, write_corpus

    if args.people * args.templates > MAX_DOCUMENTS:
        fail(
            f"--people={args.people} --templates={args.templates}: {args.people * args.templates:,} biographies, "
            f"more than the limit of {MAX_DOCUMENTS:,}; give fewer people or templates"
        )
    need = estimate_corpus(args.people, args.templates, args.seed)  # before anything is generated
    from pkmlm.checkpoint.export import available_ram

    have_ram = available_ram()
    probe = out if out.exists() else next((p for p in out.absolute().parents if p.exists()), Path("/"))
    have_disk = float(shutil.disk_usage(probe).free)
    if need["memory"] > have_ram or need["disk"] > have_disk:
        fail(
            f"--people={args.people} --templates={args.templates}: about {need['memory'] / 1e9:,.1f} GB of memory "
            f"and {need['disk'] / 1e9:,.1f} GB on disk, but {have_ram / 1e9:,.1f} GB of RAM and "
            f"{have_disk / 1e9:,.1f} GB of disk are available; give fewer people or templates"
        )

    try:
        meta = write_corpus(out, args.people, args.seed, args.templates)
    except OSError as error:
        fail(f"--out={args.out!r}: cannot write there ({error.strerror or error})")
    print(
        json.dumps({"out": str(out), **{k: meta[k] for k in ("people", "documents", "bits_per_person", "total_bits")}}),
        flush=True,
    )


if __name__ == "__main__":
    main()
