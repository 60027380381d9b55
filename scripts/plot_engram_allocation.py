"""The README's allocation figure (issue 23): final validation perplexity against the share of the
table budget in Engram, from docs/results/engram_allocation.json (the default zero-table init) and
the same file at `OLD_COMMIT` (the first sweep, tables N(0, 1) at init), with the dense arm as a
reference line (the variants sweep's dense run, docs/results/variants_sweep.json: same data, seed
and schedule).

    python scripts/plot_engram_allocation.py [--out docs/figures/engram_allocation.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "docs/results/engram_allocation.json"
VARIANTS = "docs/results/variants_sweep.json"  # its "dense (baseline)" row: the reference line
OLD_COMMIT = "58e4e6e"  # the last commit whose results file holds the old-init sweep


def _column(result: dict, name: str) -> int:
    return [c if isinstance(c, str) else c["name"] for c in result["columns"]].index(name)


def curve(result: dict) -> tuple[list[int], list[float]]:
    """(share in Engram %, final val ppl) per row: the table's first and 'final val ppl' columns."""
    at = _column(result, "final val ppl")
    return [int(row[0].rstrip("%")) for row in result["rows"]], [row[at] for row in result["rows"]]


def dense_ppl(variants: dict) -> float:
    """The variants sweep's dense arm's final val ppl (its row starting with 'dense')."""
    at = _column(variants, "final val ppl")
    dense = [row[at] for row in variants["rows"] if row[0].startswith("dense")]
    if not dense:
        raise SystemExit(f"plot_engram_allocation: {VARIANTS} has no dense row: re-run the variants sweep's report")
    return dense[0]


def old_results(root: Path) -> dict:
    """The allocation results file as it was at `OLD_COMMIT` (from git: needs the repository's history)."""
    shown = subprocess.run(["git", "show", f"{OLD_COMMIT}:{RESULTS}"], cwd=root, capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(
            f"plot_engram_allocation: cannot read {RESULTS} at commit {OLD_COMMIT} "
            f"({(shown.stderr.strip().splitlines() or ['git failed'])[-1]}): "
            "run it in a clone with the repository's history (not a shallow one)"
        )
    return json.loads(shown.stdout)


def plot(new: dict, old: dict, dense: float, out: Path) -> None:
    """The figure: the zero-init curve (`new`), the old-init one (`old`), the dense reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x, y = curve(new)
    ax.plot(x, y, "o-", color="tab:blue", label="Engram tables zero at init (default)")
    ax.plot(*curve(old), "s--", color="tab:gray", label="Engram tables N(0, 1) at init (old)")
    ax.axhline(dense, color="tab:red", lw=1, ls=":", label=f"dense (no table), {dense:.1f}")
    for xi, yi in zip(x, y):
        ax.annotate(f"{yi:.0f}", (xi, yi), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_ylim(640, 940)
    ax.set_xlabel("share of the 4.19M table parameters in Engram (%), the rest in a 2019 product-key memory")
    ax.xaxis.label.set_size(8)
    ax.set_ylabel("validation perplexity after 150 steps")
    ax.set_title("Allocation: product keys or Engram (one seed, 150 steps)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/figures/engram_allocation.png")
    args = parser.parse_args()
    old = old_results(ROOT)  # before the figure: the one input that may be missing (a shallow clone)
    new = json.loads((ROOT / RESULTS).read_text())
    plot(new, old, dense_ppl(json.loads((ROOT / VARIANTS).read_text())), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
