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

from pkmlm.cli._common import ArgumentParser, fail
from pkmlm.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="pkmlm-export", usage="pkmlm-export RUN --out DIR [--format hf]", description=__doc__.split("\n\n")[0]
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
    args = parser.parse_args(argv)
    try:
        from pathlib import Path

        from pkmlm.paths import dir_problem
        from pkmlm.run import export_run, load_run

        problem = dir_problem(Path(args.out))
        if problem is not None:
            raise UserError(f"--out {args.out}: {problem}; choose another directory")
        out = export_run(load_run(args.run), Path(args.out), fmt=args.format)
    except UserError as e:
        fail(str(e))
    extra = ", modeling_pkmlm.py, tokenizer_config.json, generation_config.json" if args.format == "hf" else ""
    print(f"exported {args.run} to {out} (model.safetensors, config.json, tokenizer.json{extra})")


if __name__ == "__main__":
    main()
