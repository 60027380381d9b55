"""Does Engram store a person's facts under the n-grams of the person's name? (issue 23, the reading
of the knowledge sweep's `engram` arm: it stores 15,000 bits after 40 exposures, when every other
arm is below 1,000.)

A causal test on a trained run, no training. A share of the people (`--share`, drawn with `--seed`), group A, lose
the Engram table rows that the n-grams containing a token of their name hash to: the rows are set
to zero (what a row never trained holds under the default zero-table init). Recall is then
measured on the run's own questions, for group A and for the others, B, apart. If a person's
facts are stored under their name's n-grams, A's recall collapses and B's stays (B loses only what
hash collisions share with A). Control: as many rows drawn at random from the rest of the table,
zeroed instead. The rows are found with the layer's own hashing (`EngramLayer.rows`) on each text
as the model reads it (end-of-text first, as `evaluate_recall` feeds a prompt); a name's tokens
are those whose character spans overlap an occurrence of the person's name (`--inside`: only the
n-grams made of name tokens alone, no neighbouring word).

    python scripts/engram_name_ablation.py RUN_DIR/checkpoints/step_XXXXXXXX.dcp FACTS_DIR [--share 0.1] [--inside]

Prints one JSON line per condition and group: rows zeroed, bits stored, exact match.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def name_token_mask(encoding, text: str, name: str) -> list[bool]:
    """Per token of `encoding` (of `text`): whether its character span overlaps an occurrence of `name`."""
    spans, at = [], text.find(name)
    while at >= 0:
        spans.append((at, at + len(name)))
        at = text.find(name, at + 1)
    return [any(s < hi and lo < e for lo, hi in spans) for (s, e) in encoding.offsets]


def name_and_other_rows(layer, tokenizer, eot_id: int, text: str, name: str, neighbours: bool) -> tuple[set, set]:
    """The Engram table rows that `text` (read as the model reads it: end-of-text, then its tokens)
    reads through the n-grams of `name` (made of name tokens only; with `neighbours`, every n-gram
    with a name token), and the rows it reads through every other n-gram."""
    enc = tokenizer.encode(text)
    is_name = [False, *name_token_mask(enc, text, name)]
    rows_TR = layer.rows(torch.tensor([[eot_id, *enc.ids]]))[0]  # (T, orders x heads)
    named: set[int] = set()
    other: set[int] = set()
    for t in range(rows_TR.shape[0]):
        for n in range(2, layer.max_ngram + 1):  # order n: row columns (n-2)*H .. (n-1)*H
            span = is_name[max(0, t - n + 1) : t + 1]
            of_name = any(span) if neighbours else (len(span) == n and all(span))
            (named if of_name else other).update(rows_TR[t, (n - 2) * layer.heads : (n - 1) * layer.heads].tolist())
    return named, other


def name_rows(layer, tokenizer, eot_id: int, text: str, name: str, inside: bool) -> set[int]:
    """The table rows read by the n-grams of `text` that contain a token of `name` (with `inside`:
    only those whose tokens are all the name's), the text read as the model reads it: end-of-text,
    then its tokens."""
    return name_and_other_rows(layer, tokenizer, eot_id, text, name, neighbours=not inside)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of a knowledge run with an Engram layer")
    parser.add_argument("facts", type=Path, help="the run's facts directory (bios.jsonl, qa.jsonl)")
    parser.add_argument("--seed", type=int, default=0, help="seeds group A and the random control rows")
    parser.add_argument("--share", type=float, default=0.1, help="the share of the people in group A")
    parser.add_argument("--inside", action="store_true", help="only n-grams made of name tokens alone")
    args = parser.parse_args()

    from pkmlm.data.tokenizer import eos_id
    from pkmlm.metrics.recall import evaluate_recall, read_questions
    from pkmlm.model.variants.engram import EngramLayer
    from pkmlm.run import load_run

    run = load_run(args.checkpoint)
    layers = [m for m in run.model.modules() if isinstance(m, EngramLayer)]
    if len(layers) != 1:
        raise SystemExit(f"{args.checkpoint}: {len(layers)} Engram layers; this test reads a model with one")
    layer, eot = layers[0], eos_id(run.tokenizer)
    questions = read_questions(args.facts / "qa.jsonl")
    bios = [json.loads(line) for line in (args.facts / "bios.jsonl").read_text().splitlines() if line.strip()]
    people = sorted({q.person for q in questions})
    generator = torch.Generator().manual_seed(args.seed)
    drawn = torch.randperm(len(people), generator=generator)[: round(args.share * len(people))]
    group_a = {people[i] for i in drawn.tolist()}
    asked = {"A": [q for q in questions if q.person in group_a], "B": [q for q in questions if q.person not in group_a]}
    with torch.no_grad():
        rows_a: set[int] = set()
        for text, person in [(b["text"], b["person"]) for b in bios] + [(q.prompt, q.person) for q in questions]:
            if person in group_a:
                rows_a |= name_rows(layer, run.tokenizer, eot, text, person, args.inside)
        rest = sorted(set(range(layer.tables.num_embeddings)) - rows_a)
        random_rows = {rest[i] for i in torch.randperm(len(rest), generator=generator)[: len(rows_a)].tolist()}
        original = layer.tables.weight.detach().clone()
        conditions = (("none", set()), ("group A's name n-gram rows", rows_a), ("as many random rows", random_rows))
        for label, rows in conditions:
            layer.tables.weight.copy_(original)
            if rows:
                layer.tables.weight[torch.tensor(sorted(rows))] = 0.0
            for group, qs in asked.items():
                metrics = evaluate_recall(run.model, run.tokenizer, qs)
                record = {
                    "zeroed": label,
                    "inside": args.inside,
                    "rows": len(rows),
                    "rows_in_table": layer.tables.num_embeddings,
                    "group": group,
                    "people": len({q.person for q in qs}),
                    "bits": round(metrics["recall/bits"], 1),
                    "exact_match": round(metrics["recall/exact_match"], 4),
                }
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
