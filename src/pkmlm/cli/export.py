"""`pkmlm-export RUN --out DIR`: a trained model as three plain files for sharing.

`DIR/model.safetensors` (the weights), `DIR/config.json` (the model config, the run's config, its
step and tokens) and `DIR/tokenizer.json`; with `--format hf` also what Hugging Face transformers
needs to load DIR without pkmlm (`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`,
`AutoTokenizer.from_pretrained(DIR)`: pkmlm/checkpoint/hf_export.py). `pkmlm.load_run(DIR)` and
`pkmlm-eval checkpoint=DIR` read it back (same logits as the run it came from); nothing in it is
pickled, so loading it runs no code (transformers runs the copied modeling_pkmlm.py: hence its
`trust_remote_code=True`). RUN is a run directory (its newest valid checkpoint) or one checkpoint directory.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pkmlm.cli._common import ArgumentParser, fail
from pkmlm.errors import UserError

RUN_MARKERS = ("checkpoints", "metrics.jsonl", ".lock")  # what makes a directory a run's


def check_out(out: Path, run: Path, force: bool) -> None:
    """Refuse an `--out` that would replace the user's files or shadow a run (one line): a run
    directory (or a folder inside one's checkpoints/), RUN itself, a non-empty directory without
    `--force`, a file, or a place this user cannot write."""
    from pkmlm.paths import dir_problem

    out_abs, run_abs = out.expanduser().absolute(), run.expanduser().absolute()
    if out_abs == run_abs or any((out_abs / m).exists() for m in RUN_MARKERS):
        raise UserError(
            f"--out {out}: a run directory; an export there would stand in for its newest checkpoint "
            "(pkmlm-eval, load_run); choose a directory outside the run"
        )
    if out_abs.is_relative_to(run_abs / "checkpoints"):
        raise UserError(f"--out {out}: inside a run's checkpoints/; choose a directory outside the run")
    if out_abs.exists() and not out_abs.is_dir():
        raise UserError(f"--out {out}: a file, not a directory; choose another directory")
    if out_abs.is_dir() and any(out_abs.iterdir()) and not force:
        raise UserError(
            f"--out {out}: not empty; choose an empty or new directory, or give --force to replace its contents"
        )
    problem = dir_problem(out_abs)
    if problem is not None:
        raise UserError(f"--out {out}: {problem}; choose another directory")


def write_atomically(out: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` into a temporary directory beside `out`, then renamed to `out` (an existing `out`,
    already allowed by `check_out`, is replaced only then): a failure (a full disk) leaves no
    half-written export and `out` as it was, and is one line."""
    out = out.expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        # safetensors (Rust) reports the OS's refusal as "I/O error: ... (os error N)"
        found = re.search(r"os error (\d+)", str(e))
        code = e.errno if isinstance(e, OSError) else int(found.group(1)) if found else None
        if code is None:
            raise
        full = code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        raise UserError(
            f"--out {out}: cannot write the export: {os.strerror(code)} (errno {errno.errorcode.get(code, code)}); "
            f"nothing was written{'; free space and run again' if full else ''}"
        ) from None
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="pkmlm-export",
        usage="pkmlm-export RUN --out DIR [--format hf] [--force]",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("run", metavar="RUN", help="run directory or checkpoint directory")
    parser.add_argument(
        "--out", required=True, help="directory to write model.safetensors, config.json, tokenizer.json into"
    )
    parser.add_argument(
        "--format",
        choices=("pkmlm", "hf"),
        default="pkmlm",
        help="hf: also modeling_pkmlm.py, tokenizer_config.json and generation_config.json, so that "
        "transformers' AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) loads it",
    )
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    args = parser.parse_args(argv)
    try:
        from pkmlm.run import export_run, load_run

        check_out(Path(args.out), Path(args.run), args.force)  # before anything is loaded
        run = load_run(args.run)
        out = write_atomically(Path(args.out), lambda tmp: export_run(run, tmp, fmt=args.format))
    except UserError as e:
        fail(str(e))
    extra = ", modeling_pkmlm.py, tokenizer_config.json, generation_config.json" if args.format == "hf" else ""
    print(f"exported {args.run} to {out} (model.safetensors, config.json, tokenizer.json{extra})")


if __name__ == "__main__":
    main()
