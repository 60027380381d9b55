"""Measured results as files: every measured table of README.md and docs/benchmarks.md is rendered
from one JSON file under docs/results/, so a number cannot be edited by hand or go stale silently.

A results file (docs/results/<name>.json) holds one table and where it came from::

    {
      "command": "pkmlm-train",                  # what produced the numbers (exactly, to rerun)
      "commit": "960802b",                       # the git commit it ran at (`git rev-parse --short HEAD`)
      "date": "2026-12-06",
      "machine": "2-core x86_64 CPU, 24 GiB",     # or the GPU, in words
      "torch": "2.13.0+cpu",
      "threads": 2,                              # torch threads (an int, or a string such as "1 per job")
      "load": "quiet (load average 0.1-1.2)",    # what else ran: numbers are only as good as this
      "columns": ["step", {"name": "val ppl", "format": ".1f"}],
      "rows": [[200, 677.2], [400, 469.6]],
      "note": "optional sentence rendered under the table"
    }

A column is a header string or `{"name", "format"}` where `format` is a Python format spec applied to
number cells (",", ".1f", ".2%", ...). A cell is a string (verbatim markdown), a number (formatted by
its column), null (rendered as an empty cell) or a list of those (joined with " / ", for "615 / 427 / 354"
cells). The rendered block is the table, then one provenance line naming the file, commit, date,
machine, torch, threads, load and command.

In a markdown document a block is written as::

    <!-- results:NAME -->
    ...whatever render_document last wrote...
    <!-- /results:NAME -->

`python -m pkmlm.results` (`make results`) rewrites the blocks of README.md and docs/benchmarks.md;
`--check` only compares, and tests/unit/test_results.py runs that comparison. A table outside any block
must say why it is not a measurement: a `<!-- not-measured: reason -->` line right above it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Union

from pkmlm.errors import UserError


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows: the machine
    named in a results file's provenance."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The provenance every results file must carry, and each key's JSON type (the check below).
REQUIRED = {
    "command": str,
    "commit": str,
    "date": str,
    "machine": str,
    "torch": str,
    "threads": (int, str),
    "load": str,
    "columns": list,
    "rows": list,
}
OPTIONAL = {"note": str, "title": str}
BLOCK_RE = re.compile(r"<!-- results:([A-Za-z0-9_.-]+) -->\n(.*?)<!-- /results:\1 -->", re.DOTALL)
NOT_MEASURED = "<!-- not-measured:"
DOCUMENTS = ("README.md", "docs/benchmarks.md")
Cell = Union[str, int, float, None, List[Any]]


class ResultsError(UserError):
    """A results file or block that is missing or malformed (one line: file, field, what to do)."""


@dataclass
class Column:
    name: str
    format: str = ""


@dataclass
class Result:
    """One results file: its table and its provenance."""

    name: str
    command: str
    commit: str
    date: str
    machine: str
    torch: str
    threads: Union[int, str]
    load: str
    columns: List[Column]
    rows: List[List[Cell]]
    note: str = ""
    title: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


def load(path: str) -> Result:
    """The results file at `path`, checked: every required key with its type, rows as wide as the
    columns, formats that Python accepts. Extra keys (raw measurements, per-seed values) are kept."""
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file; write it (docs/results/README.md says how)") from None
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: a results file is a JSON object, not {type(data).__name__}")
    for key, kind in REQUIRED.items():
        if key not in data:
            raise ResultsError(f"{path}: missing {key!r}; every result names {', '.join(REQUIRED)}")
        if not isinstance(data[key], kind) or (kind is str and not data[key].strip()):
            raise ResultsError(f"{path}: {key!r} must be a non-empty {getattr(kind, '__name__', 'int or str')}")
    for key, kind in OPTIONAL.items():
        if key in data and not isinstance(data[key], kind):
            raise ResultsError(f"{path}: {key!r} must be a {kind.__name__}")
    columns = [_column(path, i, c) for i, c in enumerate(data["columns"])]
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, list) or len(row) != len(columns):
            raise ResultsError(f"{path}: row {i} must be a list of {len(columns)} cells (one per column)")
    known = set(REQUIRED) | set(OPTIONAL)
    result = Result(
        name=name,
        columns=columns,
        extra={k: v for k, v in data.items() if k not in known},
        **{k: data[k] for k in REQUIRED if k != "columns"},
        **{k: data[k] for k in OPTIONAL if k in data},
    )
    render_table(result)  # a cell or format the renderer cannot take fails here, naming the file
    return result


def _column(path: str, i: int, spec: Any) -> Column:
    if isinstance(spec, str):
        return Column(spec)
    if isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("format", ""), str):
        fmt = spec.get("format", "")
        try:
            format(1.5, fmt)
        except ValueError:
            raise ResultsError(f"{path}: column {i} format {fmt!r} is not a Python format spec") from None
        return Column(spec["name"], fmt)
    raise ResultsError(f"{path}: column {i} must be a header string or {{'name': ..., 'format': ...}}")


def _cell(result: Result, column: Column, value: Cell) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, column.format) if column.format else str(value)
    if isinstance(value, str):
        return value.replace("|", "\\|") if "\\|" not in value else value
    if isinstance(value, list):
        return " / ".join(_cell(result, column, v) for v in value)
    raise ResultsError(f"docs/results/{result.name}.json: a cell of column {column.name!r} is {type(value).__name__}")


def provenance(result: Result) -> str:
    """The line under each rendered table: where and how its numbers were measured."""
    if isinstance(result.threads, int):
        threads = f"{result.threads} thread{'s' if result.threads != 1 else ''}"
    else:
        threads = f"threads: {result.threads}"
    return (
        f"<sub>Source: [docs/results/{result.name}.json](docs/results/{result.name}.json) · commit "
        f"`{result.commit}` · {result.date} · {result.machine} · torch {result.torch} · {threads} · load: "
        f"{result.load} · `{result.command}`</sub>"
    )


def render_table(result: Result) -> str:
    """The markdown of one result: title (when any), table, note (when any), provenance line."""
    lines = [f"**{result.title}**", ""] if result.title else []
    lines.append("| " + " | ".join(c.name for c in result.columns) + " |")
    lines.append("|" + "---|" * len(result.columns))
    for row in result.rows:
        lines.append("| " + " | ".join(_cell(result, c, v) for c, v in zip(result.columns, row)) + " |")
    lines.append("")
    if result.note:
        lines += [result.note, ""]
    lines.append(provenance(result))
    return "\n".join(lines) + "\n"


def render_document(text: str, results_dir: str, doc_dir: str = "") -> str:
    """`text` with every results block re-rendered from `results_dir`/<name>.json. Links in the
    provenance line are made relative to `doc_dir` (the document's folder, relative to the root)."""

    def block(match: re.Match) -> str:
        name = match.group(1)
        body = render_table(load(os.path.join(results_dir, f"{name}.json")))
        if doc_dir:
            up = "../" * len([p for p in doc_dir.split("/") if p])
            body = body.replace("](docs/results/", f"]({up}docs/results/")
        return f"<!-- results:{name} -->\n{body}<!-- /results:{name} -->"

    return BLOCK_RE.sub(block, text)


def unmarked_tables(text: str) -> List[str]:
    """Header lines of markdown tables that are neither inside a results block nor preceded by a
    `<!-- not-measured: ... -->` line (blank lines between allowed). Fenced code is skipped."""
    spans = [m.span() for m in BLOCK_RE.finditer(text)]
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    found, in_fence = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_fence = not in_fence
        is_header = line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---")
        if in_fence or not is_header or any(a <= starts[i] < b for a, b in spans):
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j < 0 or not lines[j].startswith(NOT_MEASURED):
            found.append(line)
    return found


def referenced(root: str, documents: Sequence[str] = DOCUMENTS) -> List[str]:
    """Names of the results files that the documents' blocks render."""
    names = []
    for doc in documents:
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            names += [m.group(1) for m in BLOCK_RE.finditer(f.read())]
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pkmlm.results", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=".", help="the repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when a document differs")
    args = parser.parse_args(argv)
    results_dir = os.path.join(args.root, "docs", "results")
    stale = []
    try:
        for doc in DOCUMENTS:
            path = os.path.join(args.root, doc)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            rendered = render_document(text, results_dir, os.path.dirname(doc))
            if rendered != text:
                stale.append(doc)
                if not args.check:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(rendered)
    except ResultsError as e:
        print(f"pkmlm.results: {e}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(f"pkmlm.results: {', '.join(stale)} differ from docs/results/; run `make results`", file=sys.stderr)
        return 1
    for doc in stale:
        print(f"rendered {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
