"""`pkmlm-export RUN --out DIR`: a trained model as three plain files for sharing.

`DIR/model.safetensors` (the weights), `DIR/config.json` (the model config, the run's config, its
step and tokens) and `DIR/tokenizer.json`. `pkmlm.load_run(DIR)` and `pkmlm-eval checkpoint=DIR`
read it back (same logits as the run it came from); nothing in it is pickled, so loading it runs no
code. RUN is a run directory (its newest valid checkpoint) or one checkpoint directory.
"""

from __future__ import annotations

from pkmlm.cli._common import ArgumentParser, fail
from pkmlm.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="pkmlm-export", usage="pkmlm-export RUN --out DIR", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run", metavar="RUN", help="run directory or checkpoint directory")
    parser.add_argument(
        "--out", required=True, help="directory to write model.safetensors, config.json, tokenizer.json into"
    )
    args = parser.parse_args(argv)
    try:
        from pathlib import Path

        from pkmlm.paths import dir_problem
        from pkmlm.run import export_run, load_run

        problem = dir_problem(Path(args.out))
        if problem is not None:
            raise UserError(f"--out {args.out}: {problem}; choose another directory")
        out = export_run(load_run(args.run), Path(args.out))
    except UserError as e:
        fail(str(e))
    print(f"exported {args.run} to {out} (model.safetensors, config.json, tokenizer.json)")


if __name__ == "__main__":
    main()
