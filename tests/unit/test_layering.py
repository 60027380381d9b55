"""The import layering of the whole package (docs/architecture.md, "Module map"): a module imports
only from its own package or from a lower layer, and no modules import each other in a cycle.
Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "pkmlm"

# Lowest first. A new top-level module or package gets its layer here and in docs/architecture.md.
LAYERS = {
    "errors": 0,
    "results": 1,
    "paths": 0,
    "model": 1,
    "data": 1,
    "metrics": 2,
    "optim": 2,
    "parallel": 3,
    "analysis": 3,
    "finetune": 3,
    "checkpoint": 4,
    "config": 5,
    "train": 6,
    "run": 6,
    "experiments": 7,
    "harness": 7,
    "knowledge": 8,
    "cli": 9,
    "__init__": 10,
}
# Known exceptions, each to be removed by the change that fixes it (the test fails while one is
# listed but no longer needed, so the list only shrinks).
KNOWN_UPWARD: set = set()
KNOWN_CYCLES: set = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pkmlm modules that module `name` imports (a `from pkg import x` of a submodule x
    counts as importing pkg.x)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pkmlm"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the containing package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.startswith("pkmlm"):
                subs = {f"{module}.{a.name}" for a in node.names} & known
                found.update(subs or {module})
    return {m for m in found if m in known and m != name}


def _layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{module}: top-level {top!r} has no layer; add it to LAYERS and docs/architecture.md"
    return top, LAYERS[top]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_module_imports_from_a_layer_above_it():
    upward = set()
    for module, imported in _graph().items():
        top, layer = _layer_of(module)
        for other in imported:
            other_top, other_layer = _layer_of(other)
            if other_top != top and other_layer >= layer:
                upward.add((module, other))
    assert upward - KNOWN_UPWARD == set(), sorted(upward - KNOWN_UPWARD)
    assert KNOWN_UPWARD - upward == set(), f"fixed, remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - upward)}"


def _cycles(graph: dict[str, set[str]]) -> set[frozenset]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.add(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its submodules is not a cycle of the design.
    graph = {m: {o for o in deps if not m.startswith(o + ".")} for m, deps in graph.items()}
    cycles = _cycles(graph)
    assert cycles - KNOWN_CYCLES == set(), [sorted(c) for c in cycles - KNOWN_CYCLES]
    assert KNOWN_CYCLES - cycles == set(), f"fixed, remove from KNOWN_CYCLES: {KNOWN_CYCLES - cycles}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser finds function-local, relative and submodule imports (so the tests above can fail)."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from pkmlm.train import loop\n    from . import store\n")
    known = {"pkmlm.train", "pkmlm.train.loop", "pkmlm.checkpoint.store", "pkmlm.checkpoint"}
    assert _imports("pkmlm.checkpoint.mod", path, known) == {"pkmlm.train.loop", "pkmlm.checkpoint.store"}
