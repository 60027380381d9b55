"""The README's allocation figure (issue 23): final validation perplexity against the share of the
table budget in Engram, from docs/results/engram_allocation.json (the default zero-table init) and
the same file at `OLD_COMMIT` (the first sweep, tables N(0, 1) at init), with the dense arm as a
reference line (the variants sweep's dense run: same data, seed and schedule).

    python scripts/plot_engram_allocation.py [--out docs/figures/engram_allocation.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "docs/results/engram_allocation.json"
OLD_COMMIT = "58e4e6e"  # the last commit whose results file holds the old-init sweep
DENSE_PPL = 738.23  # the variants sweep's dense arm (README, "Memory variants")


def _curve(result: dict) -> tuple[list[int], list[float]]:
    """(share in Engram %, final val ppl) per row: the table's first and 'final val ppl' columns."""
    names = [c if isinstance(c, str) else c["name"] for c in result["columns"]]
    at = names.index("final val ppl")
    return [int(row[0].rstrip("%")) for row in result["rows"]], [row[at] for row in result["rows"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/figures/engram_allocation.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    new = json.loads((ROOT / RESULTS).read_text())
    shown = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:{RESULTS}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    old = json.loads(shown.stdout)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x, y = _curve(new)
    ax.plot(x, y, "o-", color="tab:blue", label="Engram tables zero at init (default)")
    ax.plot(*_curve(old), "s--", color="tab:gray", label="Engram tables N(0, 1) at init (old)")
    ax.axhline(DENSE_PPL, color="tab:red", lw=1, ls=":", label=f"dense (no table), {DENSE_PPL:.1f}")
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
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
