"""No function in src/ is longer than 80 lines without a one-line reason above it (issue 22): a
`# ...` comment on the line directly above the function (above its decorators). The length counts
the `def` line to the last line of the body, docstring included."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import PROJECT_ROOT

MAX_LINES = 80


def long_functions(root: Path, max_lines: int = MAX_LINES) -> list[str]:
    """`path:line name (N lines)` for each function of the `*.py` files under `root` longer than
    `max_lines` with no comment line directly above it."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            above = lines[first - 2].strip() if first >= 2 else ""
            if length > max_lines and not above.startswith("#"):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_src_is_over_80_lines_without_a_reason():
    assert long_functions(PROJECT_ROOT / "src" / "pkmlm") == []


def test_the_checker_sees_a_long_function_and_accepts_a_reason(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (package / "a.py").write_text(f"def long():\n{body}\n\ndef short():\n    return 1\n")
    (package / "b.py").write_text(
        f"# one table, kept whole: splitting it hides the order\n@staticmethod\ndef kept():\n{body}"
    )
    assert long_functions(package) == [f"pkg/a.py:1 long ({MAX_LINES + 1} lines)"]
