"""The benchmarks (scripts/bench_memory.py, bench_model.py, bench_step.py, bench_engram.py, bench_generate.py) run
with torch alone.

A GPU machine may hold torch and triton and nothing of pkmlm's training stack, so neither script
may import Hydra, omegaconf, datasets, wandb (nor the data pipeline's tokenizers) anywhere along its
import chain. Each runs here, tiny, in a fresh interpreter where those modules cannot be imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = ("hydra", "omegaconf", "datasets", "wandb", "tokenizers", "submitit")

RUNNER = """
import sys
HIDDEN = {hidden!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ImportError(f"{{name}} is not available on a bare torch machine")
        return None

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, {scripts!r})
import {module} as bench
bench.main({argv!r})
leaked = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
assert not leaked, leaked
print("BENCH-OK")
"""


def _run(module: str, argv: list[str]) -> str:
    code = RUNNER.format(hidden=HIDDEN, scripts=str(ROOT / "scripts"), module=module, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "BENCH-OK" in proc.stdout
    return proc.stdout


def test_benchlib_imports_torch_only():
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import benchlib; "
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HIDDEN!r} or m.startswith('pkmlm')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    "module,argv,expected",
    [
        (
            "bench_memory",
            ["--device", "cpu", "--threads", "1", "--repeats", "1", "--warmup", "0", "--tokens", "32"],
            [
                "## value read only",
                "## retrieval only",
                "## whole layer",
                "## value table update",
                "| pkmlm, kernel=torch | float32 |",
            ],
        ),
        (
            "bench_model",
            ["--device", "cpu", "--threads", "1", "--steps", "1", "--warmup", "0", "--batch", "1"],
            ["| dense4 | no |", "| dense8 | no |", "| mem4 | no | torch | float32 |", "train speed-up"],
        ),
        (
            "bench_engram",
            ["--repeats", "1", "--warmup", "0", "--batch", "1", "--no-default", "--results", "{tmp}"],
            ["| FFN d -> 4d -> d (GELU) | 1 |", "| Engram, tiny tables (4.2M), sparse grad | 2 |", "| hashing alone"],
        ),
        (
            "bench_generate",
            ["--device", "cpu", "--threads", "1", "--warmup", "0", "--repeats", "1", "--new-tokens", "3"]
            + ["--dim", "32", "--layers", "2", "--heads", "2", "--vocab", "64", "--n-keys", "8"]
            + ["--results", "{tmp}/bench_generate.json"],
            ["| new tokens | cached tok/s | uncached tok/s | speed-up |", "| 3 |"],
        ),
    ],
)
def test_bench_runs_without_the_training_stack(module, argv, expected, tmp_path):
    """...and the results files they write (`--results`) load (`pkmlm.results`), with their provenance
    (`benchlib.provenance`)."""
    from pkmlm.results import load

    out = _run(module, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    for line in expected:
        assert line in out, out
    for path in tmp_path.glob("*.json"):
        result = load(str(path))
        assert result.commit and "CPU (" in result.machine and "load average" in result.load, path


def test_bench_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, "scripts/bench_memory.py", "--device", "cuda"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode != 0 and "needs a CUDA build of torch and a GPU" in proc.stderr


def test_bench_step_prints_the_ratios_and_parts_and_writes_results_files(tmp_path):
    from pkmlm.results import load, render_table

    out = _run("bench_step", ["--repeats", "1", "--warmup", "0", "--results", str(tmp_path)])
    for line in ("| knowledge step (fwd, bwd, clip, AdamW)", "| default run's memory layer", "| top-k (halves"):
        assert line in out, out
    step, parts = load(str(tmp_path / "memory_step.json")), load(str(tmp_path / "memory_step_parts.json"))
    # the knowledge step at 1 thread, the layer at 1 and 2; each with the layer's top-k, with torch.topk,
    # with the fused C++ read, and with both CPU opt-ins (the fused read and the sparse score backward)
    assert [row[1] for row in step.rows] == [1] * 8 + [2] * 4
    assert [row[0].rsplit("topk_impl=", 1)[1] for row in step.rows][1::4] == ["torch"] * 3
    assert all(row[0].endswith("read_impl=cpp") for row in step.rows[2::4])
    assert all(row[0].endswith("read_impl=cpp, scores_backward=sparse") for row in step.rows[3::4])
    assert all(row[6] in ("met", "not met") for row in step.rows)
    assert {row[0] for row in parts.rows} >= {"query network", "sub-key scores", "value read", "= memory layer fwd+bwd"}
    assert "| top-k (halves + candidates), topk_impl=" in render_table(parts)
    assert "C++ kernels: " in out and step.note.startswith("C++ kernels: ")  # serial or split: said
