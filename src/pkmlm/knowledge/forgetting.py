"""The forgetting benchmark: learn new facts without forgetting old ones, per finetuning mode.

`python -m pkmlm.knowledge.forgetting --people 100 --out DIR` (README, "Forgetting"):

1. facts: one pkmlm-facts corpus of 2N people (`DIR/facts/all`), split by person into set A (the
   first N) and set B (the other N): the same attribute value sets, different people, so B is new
   knowledge of the same kind (`make_people` is sequential: the first N of 2N are the N-person corpus);
2. web text: the repository's C4 sample split into `DIR/web/heldout.jsonl` (its first
   `--heldout-docs` documents, never trained on) and `DIR/web/train.jsonl` (the rest);
3. pretraining: `experiment=forgetting/pretrain` on A's biographies mixed with the web training text;
4. finetuning on B's biographies alone, one run per `--arms` mode (`experiment=forgetting/<arm>`,
   `init_from=` the pretrained run), all for the same `--finetune-steps`;
5. evaluation with pkmlm-eval of the pretrained run and every arm: recall of A and of B
   (`eval.recall=`) and perplexity of the held-out web text (`data.files=`), into
   `DIR/results.json`; `DIR/table.md`: B recall gained, A recall kept, web perplexity change, with
   Lin et al. 2025's NaturalQuestions numbers beside them for scale.

Jobs run one at a time under `nice`, each with `--threads` threads.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pkmlm.config import default_sample_dir
from pkmlm.knowledge.sweep import run_jobs

# Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning" (arXiv 2510.15103): held-out
# NaturalQuestions F1 drop after learning TriviaQA facts, per method.
PAPER_F1_DROP = {"full": 0.89, "lora": 0.71, "sparse_memory": 0.11}
ARMS = ("full", "memory", "sparse_memory")


def split_facts(out: Path, people: int, seed: int, templates: int) -> tuple[Path, Path]:
    """`out/A` and `out/B` (bios.jsonl, qa.jsonl, meta.json): the first and the last `people` of
    one 2N-person corpus."""
    from pkmlm.knowledge.facts import make_people, write_corpus

    write_corpus(out / "all", 2 * people, seed, templates)
    everyone, _ = make_people(2 * people, seed)
    sets = {"A": {p.name for p in everyone[:people]}, "B": {p.name for p in everyone[people:]}}
    for name, members in sets.items():
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        for file in ("bios.jsonl", "qa.jsonl"):
            lines = (out / "all" / file).read_text().splitlines()
            (directory / file).write_text(
                "".join(line + "\n" for line in lines if json.loads(line)["person"] in members)
            )
        meta = json.loads((out / "all" / "meta.json").read_text())
        meta.update(
            {
                "people": people,
                "documents": people * templates,
                "set": name,
                "total_bits": people * meta["bits_per_person"],
            }
        )
        (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / "A", out / "B"


def split_web(source: Path, out: Path, heldout_docs: int) -> tuple[Path, Path]:
    """`out/heldout.jsonl` (the first `heldout_docs` documents of `source`) and `out/train.jsonl`."""
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(source, "rt") as f:
        lines = [line for line in f if line.strip()]
    (out / "heldout.jsonl").write_text("".join(lines[:heldout_docs]))
    (out / "train.jsonl").write_text("".join(lines[heldout_docs:]))
    return out / "heldout.jsonl", out / "train.jsonl"


def evaluate(run_dir: Path, web: Path, qa: Path, threads: int) -> dict[str, Any]:
    """`pkmlm-eval checkpoint=RUN data.files=[WEB] eval.recall=QA` as a dict."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [
        "nice",
        "-n",
        "5",
        sys.executable,
        "-m",
        "pkmlm.cli.eval",
        f"checkpoint={run_dir}",
        f"data.files=[{web}]",
        f"eval.recall={qa}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_time(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["train_time_s"] for r in rows if r.get("train_time_s") is not None]
    return times[-1] if times else None


def measure(label: str, run_dir: Path, web: Path, qa_a: Path, qa_b: Path, threads: int) -> dict[str, Any]:
    a, b = evaluate(run_dir, web, qa_a, threads), evaluate(run_dir, web, qa_b, threads)
    return {
        "arm": label,
        "run_dir": str(run_dir),
        "step": a["step"],
        "train_time_s": _train_time(run_dir),
        "web_ppl": a["ppl"],
        "web_tokens": a["tokens"],
        "a_exact": a["recall/exact_match"],
        "a_bits": a["recall/bits"],
        "b_exact": b["recall/exact_match"],
        "b_bits": b["recall/bits"],
        "bits_available": a["recall/bits_available"],
    }


def table(rows: list[dict]) -> str:
    """Markdown: each arm against the pretrained run (the first row)."""
    base = rows[0]
    lines = [
        (
            "| model | B exact match (gained) | B bits stored | A exact match (kept) | A bits stored (kept) | "
            "held-out web ppl (change) | finetune time |"
        ),
        "|" + "---|" * 7,
    ]

    def kept(now: float, before: float) -> str:
        return f"{now / before:.0%}" if before else "n/a"

    for r in rows:
        if r is base:
            lines.append(
                f"| pretrained (A + web) | {r['b_exact']:.1%} | {r['b_bits']:,.0f} | {r['a_exact']:.1%} | "
                f"{r['a_bits']:,.0f} | {r['web_ppl']:.1f} | |"
            )
            continue
        lines.append(
            f"| {r['arm']} | {r['b_exact']:.1%} ({r['b_exact'] - base['b_exact']:+.1%}) | {r['b_bits']:,.0f} | "
            f"{r['a_exact']:.1%} ({kept(r['a_exact'], base['a_exact'])}) | {r['a_bits']:,.0f} "
            f"({kept(r['a_bits'], base['a_bits'])}) | {r['web_ppl']:.1f} ({r['web_ppl'] / base['web_ppl'] - 1:+.1%}) | "
            f"{r['train_time_s']:.0f} s |"
        )
    paper = ", ".join(f"{k} {v:.0%}" for k, v in PAPER_F1_DROP.items())
    return "\n".join(lines) + f"\n\nLin et al. 2025, NaturalQuestions F1 drop after learning TriviaQA: {paper}.\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pkmlm.knowledge.forgetting", description=__doc__.split("\n\n")[0])
    p.add_argument("--people", type=int, default=100, help="people per facts set (A and B)")
    p.add_argument("--seed", type=int, default=0, help="facts corpus and runs")
    p.add_argument("--templates", type=int, default=5, help="biographies per person")
    p.add_argument(
        "--web",
        default=str(Path(default_sample_dir()) / "c4" / "c4_en_train_first1000.jsonl.gz"),
        help="web text (JSON lines, gzip) to pretrain on and hold out from",
    )
    p.add_argument("--heldout-docs", type=int, default=50, help="web documents held out for the perplexity")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--arms", default=",".join(ARMS), help="experiment=forgetting/<arm> presets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--arm-overrides",
        default="",
        help="key=value[,key=value] for the finetuning arms only "
        "(e.g. finetune.optimizer=adam,finetune.lr=0.01), with --suffix naming the variant",
    )
    p.add_argument(
        "--suffix",
        default="",
        help="appended to each arm's run directory and label, and to "
        "results/table file names: variants of the arms beside the first set, same pretrained run",
    )
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (model.* reach both phases)")
    return p.parse_args(argv)


def _train(overrides: list[str], log: Path, threads: int) -> None:
    """One `pkmlm-train` run with `overrides`, its output in `log`."""
    if run_jobs([([[sys.executable, "-m", "pkmlm.cli.train", *overrides]], log)], 1, threads):
        raise SystemExit(f"forgetting: a training run failed: see {log} (fix the cause and run again)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.time()
    facts_a, facts_b = split_facts(out / "facts", args.people, args.seed, args.templates)
    heldout, web_train = split_web(Path(args.web), out / "web", args.heldout_docs)
    common = ["logging.progress=false", f"seed={args.seed}", *args.overrides]
    pretrain = out / "runs" / "pretrain"
    if not (pretrain / "checkpoints").is_dir():
        pretrain_overrides = [
            "experiment=forgetting/pretrain",
            f"data.sources.0.files=[{facts_a / 'bios.jsonl'}]",
            f"data.sources.1.files=[{web_train}]",
            f"train.max_steps={args.pretrain_steps}",
            f"hydra.run.dir={pretrain}",
            *common,
        ]
        _train(pretrain_overrides, out / "logs" / "pretrain.log", args.threads)
        if not (pretrain / "checkpoints").is_dir():
            raise SystemExit(f"pretraining failed: see {out / 'logs' / 'pretrain.log'}")
    times = {"pretrain_wall_s": time.time() - t0}
    arm_overrides = [o for o in args.arm_overrides.split(",") if o]
    names = {arm: arm + args.suffix for arm in args.arms.split(",")}
    for arm, name in names.items():
        t_arm = time.time()
        finetune_overrides = [
            f"experiment=forgetting/{arm}",
            f"init_from={pretrain}",
            f"data.files=[{facts_b / 'bios.jsonl'}]",
            f"train.max_steps={args.finetune_steps}",
            f"hydra.run.dir={out / 'runs' / name}",
            *common,
            *arm_overrides,
        ]
        _train(finetune_overrides, out / "logs" / f"{name}.log", args.threads)
        times[f"{name}_wall_s"] = time.time() - t_arm
    t_eval = time.time()
    qa_a, qa_b = facts_a / "qa.jsonl", facts_b / "qa.jsonl"
    rows = [measure("pretrained", pretrain, heldout, qa_a, qa_b, args.threads)]
    for name in names.values():
        if (out / "runs" / name / "checkpoints").is_dir():
            rows.append(measure(name, out / "runs" / name, heldout, qa_a, qa_b, args.threads))
    times.update(eval_wall_s=time.time() - t_eval, total_wall_s=time.time() - t0)
    results = {"args": vars(args), "times": times, "rows": rows}
    (out / f"results{args.suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(rows) + "\n" + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n"
    (out / f"table{args.suffix}.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
