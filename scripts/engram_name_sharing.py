"""Why does Engram stop at the same share of the facts at every N? (issue 21: the knowledge sweep's
`engram` arm stores 84% of the bits available at N=400 and at N=800, on all six attributes alike,
flat from 1x to 2x its exposures, where a full table would cap the bits, not their share.)

The name ablation (scripts/engram_name_ablation.py) showed that Engram keeps a person's facts in
the table rows that the n-grams of the person's name hash to. A row that another person's name
n-grams also read (the same BPE pieces in two names, or a hash collision) holds one mix of two
people's facts. This script asks whether the facts Engram misses are the people whose name rows are
shared. Per person: the rows that the n-grams made of the person's name tokens read, in the
person's biographies and questions as the model reads them (`engram_name_ablation.name_rows`,
`inside=True`), and the share of them that no other person's name n-grams read ("own rows").
People are grouped by that share (by its quantiles: `--bins 0,0.5,1`, the default, splits them
at the median); per group, the bits stored over the bits available (the
`recall/bits` lower bound per question, `pkmlm.metrics.recall.stored_bits`), for the Engram run
and, as the control, for a run without Engram on the same people (`--control`, e.g. the sweep's
dense run of the same seed): a gap that follows the groups in Engram and not in the control is the
table's addressing, not names that are hard to learn.

    python scripts/engram_name_sharing.py ENGRAM_CHECKPOINT FACTS_DIR [--control CHECKPOINT] [--bins 0,0.5,1]

Prints one JSON line per group (the last bin edge is inclusive): people, own-row shares, and
each run's share of the group's bits stored; then a summary line: per run, the 10th percentile and
the median of the people's own shares of their bits stored (spread over everyone, or a few people
lost whole?), and Pearson correlations over people of Engram's per-person share with the
control's (are Engram's misses the people that are hard for any model?), with the own-row share
and with the name's length in tokens. Evaluation only, deterministic.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import torch


def own_row_shares(rows_by_person: dict[str, set[int]]) -> dict[str, float]:
    """Per person, the share of its rows that no other person's rows contain (1.0 for a person
    with no rows: nothing of it is shared)."""
    readers = Counter(row for rows in rows_by_person.values() for row in rows)
    return {
        person: (sum(readers[row] == 1 for row in rows) / len(rows) if rows else 1.0)
        for person, rows in rows_by_person.items()
    }


def group_of(share: float, edges: Sequence[float]) -> int:
    """The bin of `share` among `edges` (non-decreasing; bin i is [edges[i], edges[i+1]), the last
    one closed at its top; an empty bin [e, e) holds nothing); -1 outside them."""
    for i in range(len(edges) - 1):
        if edges[i] <= share < edges[i + 1] or (i == len(edges) - 2 and edges[i] <= share == edges[-1]):
            return i
    return -1


def parse_bins(text: str) -> list[float]:
    """`--bins`: ascending quantiles within [0, 1], at least two."""
    try:
        edges = [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--bins {text!r}: give comma-separated quantiles, e.g. 0,0.5,1") from None
    if len(edges) < 2 or any(not 0 <= e <= 1 for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
        raise SystemExit(f"--bins {text!r}: give two or more ascending quantiles within [0, 1], e.g. 0,0.25,0.5,0.75,1")
    return edges


def person_bits(run, questions) -> dict[str, tuple[float, float]]:
    """Per person: (bits stored, bits available) over its questions, as `recall/bits` counts them."""
    import math

    from pkmlm.metrics.continuations import score_continuations
    from pkmlm.metrics.recall import recall_requests, stored_bits

    requests = recall_requests(run.tokenizer, questions)
    max_len = max(len(c) + len(a) for c, a in requests)
    scores = score_continuations(run.model, requests, max_len=max_len, batch_size=64)
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for q, s in zip(questions, scores):
        out[q.person][0] += stored_bits(-s.logprob, q.n_values)
        out[q.person][1] += math.log2(q.n_values)
    return {p: (b, a) for p, (b, a) in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of a knowledge run with an Engram layer")
    parser.add_argument("facts", type=Path, help="the run's facts directory (bios.jsonl, qa.jsonl)")
    parser.add_argument("--control", type=Path, help="a checkpoint of a run without Engram on the same facts")
    parser.add_argument("--bins", default="0,0.5,1", help="quantile edges of the own-row-share groups")
    args = parser.parse_args()
    edges = parse_bins(args.bins)
    for path in (args.checkpoint, args.control):
        if path is not None and not path.exists():
            raise SystemExit(f"{path}: no such checkpoint; give a step_XXXXXXXX.dcp of a run")
    for name in ("bios.jsonl", "qa.jsonl"):
        if not (args.facts / name).is_file():
            raise SystemExit(f"{args.facts}: no {name}; give the facts directory the run trained on")

    from engram_name_ablation import name_rows  # this script's sibling (scripts/ is sys.path[0])

    from pkmlm.data.tokenizer import eos_id
    from pkmlm.metrics.recall import read_questions
    from pkmlm.model.variants.engram import EngramLayer
    from pkmlm.run import load_run

    run = load_run(args.checkpoint)
    layers = [m for m in run.model.modules() if isinstance(m, EngramLayer)]
    if len(layers) != 1:
        raise SystemExit(f"{args.checkpoint}: {len(layers)} Engram layers; this script reads a model with one")
    layer, eot = layers[0], eos_id(run.tokenizer)
    questions = read_questions(args.facts / "qa.jsonl")
    bios = [json.loads(line) for line in (args.facts / "bios.jsonl").read_text().splitlines() if line.strip()]
    rows_by_person: dict[str, set[int]] = defaultdict(set)
    with torch.no_grad():
        for text, person in [(b["text"], b["person"]) for b in bios] + [(q.prompt, q.person) for q in questions]:
            rows_by_person[person] |= name_rows(layer, run.tokenizer, eot, text, person, inside=True)
        shares = own_row_shares(dict(rows_by_person))
        bits = {"engram": person_bits(run, questions)}
        if args.control is not None:
            bits["control"] = person_bits(load_run(args.control), questions)
    cuts = [quantile(list(shares.values()), e) for e in edges]  # the groups' own-row-share edges
    for g in range(len(edges) - 1):
        people = [p for p, s in shares.items() if group_of(s, cuts) == g]
        record: dict[str, object] = {
            "group": f"quantiles [{edges[g]:g}, {edges[g + 1]:g}{']' if g == len(edges) - 2 else ')'}",
            "own_row_share_range": [round(cuts[g], 4), round(cuts[g + 1], 4)],
            "people": len(people),
            "mean_own_row_share": round(sum(shares[p] for p in people) / len(people), 4) if people else None,
            "mean_name_rows": round(sum(len(rows_by_person[p]) for p in people) / len(people), 1) if people else None,
        }
        for arm, per in bits.items():
            stored = sum(per[p][0] for p in people if p in per)
            available = sum(per[p][1] for p in people if p in per)
            record[f"{arm}_bits_share"] = round(stored / available, 4) if available else None
        print(json.dumps(record), flush=True)
    print(json.dumps(summary(bits, shares, {p: len(run.tokenizer.encode(p).ids) for p in shares})), flush=True)


def quantile(values: Sequence[float], q: float) -> float:
    """The `q` quantile of `values` by linear interpolation between order statistics."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def summary(
    bits: dict[str, dict[str, tuple[float, float]]], shares: dict[str, float], name_tokens: dict[str, int]
) -> dict[str, object]:
    """The per-person view: each run's per-person bits share (stored / available) at its 10th
    percentile and median, and correlations over people of Engram's share with the control's, the
    own-row share and the name's tokens (None where a side is constant)."""
    from statistics import StatisticsError, correlation

    people = sorted(p for p in bits["engram"] if p in shares)
    per = {arm: [v[p][0] / v[p][1] if v.get(p) and v[p][1] else 0.0 for p in people] for arm, v in bits.items()}

    def corr(xs: Sequence[float], ys: Sequence[float]) -> float | None:
        if len(set(xs)) < 2 or len(set(ys)) < 2:  # fewer than two people, or a constant side
            return None  # (statistics.correlation may return a rounding residue for a constant side)
        try:
            return round(correlation(xs, ys), 3)
        except StatisticsError:
            return None

    out: dict[str, object] = {"summary": True, "people": len(people)}
    for arm, xs in per.items():
        out[f"{arm}_person_share_p10"] = round(quantile(xs, 0.1), 4)
        out[f"{arm}_person_share_median"] = round(quantile(xs, 0.5), 4)
    if "control" in per:
        out["corr_engram_control"] = corr(per["engram"], per["control"])
    out["corr_engram_own_row_share"] = corr(per["engram"], [shares[p] for p in people])
    out["corr_engram_name_tokens"] = corr(per["engram"], [float(name_tokens[p]) for p in people])
    return out


if __name__ == "__main__":
    main()
