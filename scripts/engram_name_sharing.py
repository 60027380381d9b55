"""Why does Engram stop at the same share of the facts at every N? (issue 21: the knowledge sweep's
`engram` arm stores 84% of the bits available at N=400 and at N=800, on all six attributes alike,
flat from 1x to 2x its exposures, where a full table would cap the bits, not their share.)

The name ablation (scripts/engram_name_ablation.py) showed that Engram keeps a person's facts in
the table rows that the n-grams of the person's name hash to. A row that something else also reads
(another name with the same BPE pieces, or any n-gram that hashes to it) mixes two things into
one vector. This script asks whether the facts Engram misses are the people with fewer rows of
their own. Per person: its name rows, the rows that its name's n-grams read in its biographies and
questions as the model reads them (the n-grams made of name tokens only; `--with-neighbours`: every
n-gram with a name token, i.e. also "<name piece> was" and the like), and its own rows, those of
them that nothing else in the corpus reads: no other person's name n-grams and no n-gram without a
name token. People are grouped by their share of own rows (by its quantiles: `--bins 0,0.5,1`, the
default, splits them at the median); per group, the bits stored over the bits available (the
`recall/bits` lower bound per question, `pkmlm.metrics.recall.stored_bits`, scored as
`evaluate_recall` scores), for the Engram run and, as the control, for a run without Engram on the
same people (`--control`, e.g. the sweep's dense run of the same seed at the same step): a gap that
follows the groups in Engram and not in the control is the table's addressing, not names that are
hard to learn.

    python scripts/engram_name_sharing.py ENGRAM_CHECKPOINT FACTS_DIR [--control CHECKPOINT] \\
        [--with-neighbours] [--bins 0,0.5,1]

Prints one JSON line per group (the last bin edge is inclusive): its people and their own-row
shares, each run's share of the group's bits stored; then a summary line: per run, the 10th
percentile and the median of the people's shares of their own bits stored (spread over everyone,
or a few people lost whole?), and Pearson correlations over people of Engram's per-person share
with the control's (are Engram's misses the people that are hard for any model? each person has
six questions, so these are noisy), with the own-row share, and with the name's length in tokens
(the name encoded alone). Evaluation only, deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import StatisticsError, correlation
from typing import Any, Sequence

import torch
from engram_name_ablation import name_and_other_rows  # this script's sibling (scripts/ is on sys.path)

# --- which rows are a person's own -------------------------------------------------------------------


def own_row_shares(
    rows_by_person: dict[str, set[int]], other_rows: set[int] | frozenset[int] = frozenset()
) -> dict[str, float]:
    """Per person, the share of its rows that no other person's rows and none of `other_rows` (the
    rows read by n-grams that are no name's) contain; 1.0 for a person with no rows (nothing of it
    is shared)."""
    readers = Counter(row for rows in rows_by_person.values() for row in rows)
    return {
        person: (sum(readers[row] == 1 and row not in other_rows for row in rows) / len(rows) if rows else 1.0)
        for person, rows in rows_by_person.items()
    }


# --- groups and summaries ----------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The `q` quantile of `values` by linear interpolation between order statistics."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def group_of(share: float, edges: Sequence[float]) -> int:
    """The bin of `share` among `edges` (non-decreasing; bin i is [edges[i], edges[i+1]), the last
    one closed at its top; an empty bin [e, e) holds nothing); -1 outside them."""
    for i in range(len(edges) - 1):
        if edges[i] <= share < edges[i + 1] or (i == len(edges) - 2 and edges[i] <= share == edges[-1]):
            return i
    return -1


def groups(shares: dict[str, float], quantiles: Sequence[float]) -> list[tuple[float, float, list[str]]]:
    """The people split by the `quantiles` of their shares: per group (low edge, high edge, its
    people, sorted); a person at a cut point goes to the group above it (the last group holds its
    top edge)."""
    cuts = [quantile(list(shares.values()), q) for q in quantiles]
    return [
        (cuts[g], cuts[g + 1], sorted(p for p, s in shares.items() if group_of(s, cuts) == g))
        for g in range(len(cuts) - 1)
    ]


def person_bits(run, questions) -> dict[str, tuple[float, float]]:
    """Per person: (bits stored, bits available) over its questions, scored as `evaluate_recall`
    scores them (the same requests, window and batch size), summed as `recall_metrics` sums them."""
    from pkmlm.metrics.continuations import score_continuations
    from pkmlm.metrics.recall import recall_requests, stored_bits

    requests = recall_requests(run.tokenizer, questions)
    max_len = getattr(getattr(run.model, "cfg", None), "max_seq_len", None) or max(len(c) + len(a) for c, a in requests)
    scores = score_continuations(run.model, requests, max_len=max_len, batch_size=64)
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for q, s in zip(questions, scores):
        out[q.person][0] += stored_bits(-s.logprob, q.n_values)
        out[q.person][1] += math.log2(q.n_values)
    return {p: (b, a) for p, (b, a) in out.items()}


def summary(
    bits: dict[str, dict[str, tuple[float, float]]], shares: dict[str, float], name_tokens: dict[str, int]
) -> dict[str, Any]:
    """The per-person view over the people every run scored (with bits available): each run's
    per-person bits share (stored / available) at its 10th percentile and median, and correlations
    over people of Engram's share with the control's, the own-row share and the name's tokens (None
    where a side is constant)."""
    people = sorted(p for p in shares if all(p in per and per[p][1] > 0 for per in bits.values()))
    per = {arm: [v[p][0] / v[p][1] for p in people] for arm, v in bits.items()}

    def corr(xs: Sequence[float], ys: Sequence[float]) -> float | None:
        if len(set(xs)) < 2 or len(set(ys)) < 2:  # fewer than two people, or a constant side
            return None  # (statistics.correlation can return a rounding residue for a constant side)
        try:
            return round(correlation(xs, ys), 3)
        except StatisticsError:
            return None

    out: dict[str, Any] = {"summary": True, "people": len(people)}
    for arm, xs in per.items():
        out[f"{arm}_person_share_p10"] = round(quantile(xs, 0.1), 4) if xs else None
        out[f"{arm}_person_share_median"] = round(quantile(xs, 0.5), 4) if xs else None
    if "control" in per:
        out["corr_engram_control"] = corr(per["engram"], per["control"])
    out["corr_engram_own_row_share"] = corr(per["engram"], [shares[p] for p in people])
    out["corr_engram_name_tokens"] = corr(per["engram"], [float(name_tokens[p]) for p in people])
    return out


# --- the command --------------------------------------------------------------------------------------


def parse_bins(text: str) -> list[float]:
    """`--bins`: ascending quantiles within [0, 1], at least two."""
    try:
        edges = [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--bins {text!r}: give comma-separated quantiles, e.g. 0,0.5,1") from None
    if len(edges) < 2 or any(not 0 <= e <= 1 for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
        raise SystemExit(f"--bins {text!r}: give two or more ascending quantiles within [0, 1], e.g. 0,0.25,0.5,0.75,1")
    return edges


def read_facts(facts: Path) -> tuple[list, list[tuple[str, str]]]:
    """The questions and the (text, person) of every biography of a facts directory; a one-line
    `SystemExit` for a missing file, a bad line, a question without its person, or a person asked
    about with no biography."""
    from pkmlm.errors import DataError
    from pkmlm.metrics.recall import read_questions

    for name in ("bios.jsonl", "qa.jsonl"):
        if not (facts / name).is_file():
            raise SystemExit(f"{facts}: no {name}; give the facts directory the run trained on (pkmlm-facts --out DIR)")
    try:
        questions = read_questions(facts / "qa.jsonl")
    except DataError as e:
        raise SystemExit(str(e)) from None
    bios: list[tuple[str, str]] = []
    for number, line in enumerate((facts / "bios.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            bios.append((str(record["text"]), str(record["person"])))
        except (ValueError, KeyError, TypeError):
            raise SystemExit(
                f"{facts / 'bios.jsonl'} line {number}: not a JSON object with text and person; "
                "write the directory again with pkmlm-facts"
            ) from None
    if any(not q.person for q in questions):
        raise SystemExit(f"{facts / 'qa.jsonl'}: a question without its person; write it again with pkmlm-facts")
    missing = sorted({q.person for q in questions} - {person for _, person in bios})
    if missing:
        raise SystemExit(f"{facts}: {len(missing)} people asked about have no biography (first: {missing[0]!r})")
    return questions, bios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of a knowledge run with an Engram layer")
    parser.add_argument("facts", type=Path, help="the run's facts directory (bios.jsonl, qa.jsonl)")
    parser.add_argument("--control", type=Path, help="a checkpoint of a run without Engram on the same facts")
    parser.add_argument("--with-neighbours", action="store_true", help="every n-gram with a name token is the name's")
    parser.add_argument("--bins", default="0,0.5,1", help="quantile edges of the own-row-share groups")
    args = parser.parse_args()
    edges = parse_bins(args.bins)
    for path in (args.checkpoint, args.control):
        if path is not None and not path.exists():
            raise SystemExit(f"{path}: no such checkpoint; give a step_XXXXXXXX.dcp of a run")
    questions, bios = read_facts(args.facts)

    from pkmlm.data.tokenizer import eos_id
    from pkmlm.model.variants.engram import EngramLayer
    from pkmlm.run import load_run

    runs = {"engram": load_run(args.checkpoint)}
    if args.control is not None:
        runs["control"] = load_run(args.control)
    layers = [m for m in runs["engram"].model.modules() if isinstance(m, EngramLayer)]
    if len(layers) != 1:
        raise SystemExit(f"{args.checkpoint}: {len(layers)} Engram layers; this script reads a model with one")
    layer, tokenizer = layers[0], runs["engram"].tokenizer
    eot = eos_id(tokenizer)
    rows_by_person: dict[str, set[int]] = defaultdict(set)
    other_rows: set[int] = set()
    with torch.no_grad():
        for text, person in bios + [(q.prompt, q.person) for q in questions]:
            named, other = name_and_other_rows(layer, tokenizer, eot, text, person, args.with_neighbours)
            rows_by_person[person] |= named
            other_rows |= other
        shares = own_row_shares(dict(rows_by_person), other_rows)
        bits = {arm: person_bits(run, questions) for arm, run in runs.items()}
    for g, (low, high, people) in enumerate(groups(shares, edges)):
        record: dict[str, Any] = {
            "group": f"quantiles [{edges[g]:g}, {edges[g + 1]:g}{']' if g == len(edges) - 2 else ')'}",
            "n_grams": "with neighbours" if args.with_neighbours else "name tokens only",
            "own_row_share_range": [round(low, 4), round(high, 4)],
            "people": len(people),
            "mean_own_row_share": round(sum(shares[p] for p in people) / len(people), 4) if people else None,
            "mean_name_rows": round(sum(len(rows_by_person[p]) for p in people) / len(people), 1) if people else None,
        }
        for arm, per in bits.items():
            stored = sum(per[p][0] for p in people if p in per)
            available = sum(per[p][1] for p in people if p in per)
            record[f"{arm}_bits_share"] = round(stored / available, 4) if available else None
        print(json.dumps(record), flush=True)
    print(json.dumps(summary(bits, shares, {p: len(tokenizer.encode(p).ids) for p in shares})), flush=True)


if __name__ == "__main__":
    main()
