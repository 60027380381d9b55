"""Fact recall and knowledge stored in bits, from a `qa.jsonl` of pkmlm-facts (or any file of
`{"prompt", "answer", "n_values"}` records).

For a question whose answer is one of `n` equally likely values, a model that gives the true
answer probability `p` (the product of its token probabilities after the prompt) stores at least

    bits = max(0, log2 n - nll_bits),   nll_bits = -log2 p

bits of that fact: log2 n is what the answer is worth to a reader who knows only the value set,
and -log2 p is what the model still lacks (Allen-Zhu & Li, "Physics of Language Models, Part
3.3", section 2: the capacity lower bound, here per question). A model that puts all its mass on
the answer stores log2 n bits; one that spreads it uniformly over the n values stores 0; one that
is worse than uniform also 0 (the clamp: it cannot store negative knowledge). The sum over the
questions is `recall/bits`; divided by the parameter counts it is bits per parameter, the Part 3.3
"knowledge capacity" (about 2 bits/param at 1,000 exposures, about 1 at 100).

The answer is scored as the continuation `delimiter + answer` of `end-of-text + prompt` (a
biography starts after end-of-text in training, and the answer follows its prompt after one
space); `exact_match` is greedy decoding reproducing the answer's tokens exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pkmlm.errors import DataError
from pkmlm.metrics.continuations import score_continuations
from pkmlm.paths import file_problem

__all__ = [
    "Question",
    "evaluate_recall",
    "parameter_counts",
    "read_questions",
    "recall_metrics",
    "stored_bits",
]

LN2 = math.log(2)


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: str
    n_values: int  # size of the answer's value set (uniform prior)
    attribute: str = ""
    person: str = ""


def read_questions(path: str | Path) -> list[Question]:
    """Every record of a qa.jsonl; a `DataError` naming the file and line for a bad one."""
    path = Path(path)
    problem = file_problem(path)  # stat only: a FIFO or device is refused without opening it
    if problem is not None:
        raise DataError(
            f"eval.recall={str(path)!r}: {problem}; give a qa.jsonl, e.g. one written by "
            "pkmlm-facts --people N --seed S --out DIR (DIR/qa.jsonl)"
        )
    questions = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise DataError(
            f"eval.recall={str(path)!r}: not UTF-8 text (byte {e.start}); give a qa.jsonl written by pkmlm-facts"
        ) from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"eval.recall={str(path)!r} line {line_no}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where}: not a JSON object") from None
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r.get(k) for k in ("prompt", "answer")):
            raise DataError(f"{where}: needs non-empty string fields 'prompt' and 'answer'")
        n = r.get("n_values")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"{where}: 'n_values' must be an integer >= 1 (the answer's value-set size), got {n!r}")
        questions.append(Question(r["prompt"], r["answer"], n, str(r.get("attribute", "")), str(r.get("person", ""))))
    if not questions:
        raise DataError(f"eval.recall={str(path)!r}: no questions in the file")
    return questions


def check_recall_fits(
    questions: Sequence[Question], tokenizer: Any, window: int, path: Any, delimiter: str = " "
) -> None:
    """Every answer (`delimiter + answer`, as scored) fits the model's window of `window` tokens, or
    one `DataError` naming the file's first offender: checked before training or evaluation starts,
    not at the first evaluation (issue 25)."""
    for number, q in enumerate(questions, 1):
        n = len(tokenizer.encode(delimiter + q.answer).ids)
        if n > window:
            raise DataError(
                f"eval.recall={str(path)!r} question {number}: its answer is {n} tokens, longer than the "
                f"model's window of {window}; shorten the answer or use a longer data.seq_len"
            )


def stored_bits(nll_nats: float, n_values: int) -> float:
    """Bits of one fact stored, lower bound: max(0, log2 n_values - nll / ln 2)."""
    return max(0.0, math.log2(n_values) - nll_nats / LN2)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """pkmlm's `Transformer.count_parameters()` (total, active, memory_values, embedding); for any
    other module, all its parameters as total and active."""
    if hasattr(model, "count_parameters"):
        return dict(model.count_parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "active": total, "memory_values": 0, "embedding": 0}


def recall_metrics(
    questions: list[Question], nll_nats: list[float], exact: list[bool], params: dict[str, int]
) -> dict[str, Any]:
    """The `recall/*` metrics from per-question answer NLLs (nats) and greedy matches.

    `recall/bits_per_param/{total,active,memory_values}`: bits over each count (memory_values only
    for a model that has memory); `recall/params/*`: the counts themselves, the embedding's
    reported separately (a tied output embedding of many-valued attributes stores facts too).
    Per attribute: `recall/by_attribute/<a>/{exact_match,bits}`.
    """
    bits = [stored_bits(nll, q.n_values) for q, nll in zip(questions, nll_nats)]
    total_bits = sum(bits)
    out: dict[str, Any] = {
        "recall/questions": len(questions),
        "recall/people": len({q.person for q in questions if q.person}),
        "recall/exact_match": sum(exact) / len(questions),
        "recall/answer_nll": sum(nll_nats) / len(questions),
        "recall/bits": total_bits,
        "recall/bits_available": sum(math.log2(q.n_values) for q in questions),
    }
    for key in ("total", "active", "memory_values"):
        if params.get(key):
            out[f"recall/bits_per_param/{key}"] = total_bits / params[key]
    for key in ("total", "active", "memory_values", "embedding"):
        out[f"recall/params/{key}"] = int(params.get(key, 0))
    attributes = sorted({q.attribute for q in questions if q.attribute})
    for a in attributes:
        idx = [i for i, q in enumerate(questions) if q.attribute == a]
        out[f"recall/by_attribute/{a}/exact_match"] = sum(exact[i] for i in idx) / len(idx)
        out[f"recall/by_attribute/{a}/bits"] = sum(bits[i] for i in idx)
    return out


def recall_requests(
    tokenizer: Any, questions: Sequence[Question], delimiter: str = " "
) -> list[tuple[list[int], list[int]]]:
    """Each question as a `score_continuations` request: (end-of-text + the prompt's ids, the ids of
    the delimiter + the answer), the pass `evaluate_recall` scores."""
    from pkmlm.data.tokenizer import eos_id

    eos = eos_id(tokenizer)
    return [([eos] + tokenizer.encode(q.prompt).ids, tokenizer.encode(delimiter + q.answer).ids) for q in questions]


def evaluate_recall(
    model: torch.nn.Module,
    tokenizer: Any,
    qa_path: str | Path | Sequence[Question],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    max_questions: int | None = None,
    delimiter: str = " ",
) -> dict[str, Any]:
    """Recall metrics of `model` (a causal LM: pkmlm's Transformer, or a module returning logits)
    on the questions of `qa_path` (a qa.jsonl, or questions already read by `read_questions`), with
    `tokenizer` (a `tokenizers.Tokenizer` whose end-of-text starts every prompt). `max_questions`
    scores only the first that many (a quick check during training); the model's train/eval mode
    is restored. Runs on the model's device unless `device` is given."""
    questions = list(qa_path) if not isinstance(qa_path, (str, Path)) else read_questions(qa_path)
    if max_questions is not None:
        questions = questions[:max_questions]
    requests = recall_requests(tokenizer, questions, delimiter)
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None) or max(len(c) + len(a) for c, a in requests)
    scores = score_continuations(model, requests, max_len=max_len, batch_size=batch_size, device=device)
    return recall_metrics(questions, [-s.logprob for s in scores], [s.greedy for s in scores], parameter_counts(model))
