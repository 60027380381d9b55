"""The comparison report: a markdown table, a CSV and PNG plots from summarised runs.

Ratios are against a baseline run (the first, unless chosen): `speed x` = the run's training
tokens/s / the baseline's (above 1: faster), `ppl x` = its final validation perplexity / the
baseline's (below 1: better). Training tokens/s = tokens / training time (evaluation and
checkpoints excluded); wall time is the whole run from its first step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

from pkmlm.experiments.runs import RunSummary, matching_report
from pkmlm.metrics.formatting import duration as _duration
from pkmlm.metrics.formatting import number as _num
from pkmlm.metrics.formatting import si
from pkmlm.model import variants

__all__ = ["write_report", "table_rows", "markdown_table"]


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _memory_text(run: RunSummary) -> str:
    if not run.memory_layers:
        return "none"
    size = f"{int(math.isqrt(run.memory_values))}²" if run.memory_values else "?"
    return ", ".join(f"L{i}" for i in run.memory_layers) + f" ({size})"


def _usage_text(run: RunSummary) -> str:
    if not run.memory:
        return "—" if not run.memory_layers else "n/a"
    parts = []
    for layer in sorted(run.memory):
        m = run.memory[layer]
        usage = "n/a" if m.get("usage") is None else f"{m['usage']:.1%}"
        parts.append(f"L{layer}: {usage}, KL {_num(m.get('kl_weight'), '.2f')}/{_num(m.get('kl_count'), '.2f')}")
    return "; ".join(parts)


def table_rows(runs: list[RunSummary], baseline: int) -> list[dict[str, Any]]:
    """One dict per run with every number of the table (machine-readable: the CSV's rows)."""
    base = runs[baseline]
    layers = sorted({layer for r in runs for layer in r.memory})
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run": r.label,
            "run_dir": str(r.path),
            "name": r.name,
            "n_layers": r.n_layers,
            "dim": r.dim,
            "memory_layers": " ".join(str(i) for i in r.memory_layers),
            "memory_values": r.memory_values,
            "params_total": r.params_total,
            "params_active": r.params_active,
            "flops_per_token": r.flops_per_token,
            "tokens": r.tokens,
            "steps": r.steps,
            "wall_time_s": r.wall_time_s,
            "train_time_s": r.train_time_s,
            "tokens_per_s": r.tokens_per_s,
            "step_time_s": r.step_time_s,
            "data_time_s": r.data_time_s,
            "compute_time_s": r.compute_time_s,
            "flops_per_s": r.flops_per_s,
            "mfu": r.mfu,
            "peak_memory_gb": r.peak_memory_gb,
            "best_val_ppl": r.best_ppl,
            "final_val_ppl": r.final_ppl,
            "final_val_step": r.final_ppl_step,
            "speed_vs_baseline": _ratio(r.tokens_per_s, base.tokens_per_s),
            "ppl_vs_baseline": _ratio(r.final_ppl, base.final_ppl),
            "stopped_by": r.stopped_by,
            "baseline": r is base,
        }
        for layer in layers:
            for stat in ("usage", "kl_weight", "kl_count"):
                row[f"memory/layer{layer}/{stat}"] = r.memory.get(layer, {}).get(stat)
        rows.append(row)
    return rows


HEADERS = (
    "run",
    "layers",
    "memory",
    "params total / active",
    "tokens",
    "steps",
    "wall time",
    "train tok/s",
    "step ms (data + compute)",
    "MFU",
    "peak mem GB",
    "best ppl",
    "final ppl",
    "memory usage, KL weight/count",
    "speed ×",
    "ppl ×",
)


def markdown_table(runs: list[RunSummary], baseline: int) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    for row, r in zip(table_rows(runs, baseline), runs):
        step_ms = (
            "n/a"
            if r.step_time_s is None
            else (
                f"{r.step_time_s * 1e3:.0f} ({_num(None if r.data_time_s is None else r.data_time_s * 1e3, '.0f')}"
                f" + {_num(None if r.compute_time_s is None else r.compute_time_s * 1e3, '.0f')})"
            )
        )
        cells = [
            f"**{r.label}** (baseline)" if row["baseline"] else r.label,
            str(r.n_layers) if r.n_layers is not None else "n/a",
            _memory_text(r),
            f"{si(r.params_total, 2)} / {si(r.params_active, 2)}",
            si(r.tokens, 2),
            str(r.steps) if r.steps is not None else "n/a",
            _duration(r.wall_time_s),
            si(r.tokens_per_s, 1),
            step_ms,
            "n/a" if r.mfu is None else f"{r.mfu:.1%}",
            _num(r.peak_memory_gb, ".2f"),
            _num(r.best_ppl, ".2f"),
            _num(r.final_ppl, ".2f"),
            _usage_text(r),
            _num(row["speed_vs_baseline"], ".2f"),
            _num(row["ppl_vs_baseline"], ".3f"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


# --- plots ------------------------------------------------------------------------------------------


def _val_curve(run: RunSummary, x_key: str) -> tuple[list, list]:
    xs, ys = [], []
    for row in run.rows:
        x, y = row.get(x_key), row.get("val/ppl")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def _curves_plot(runs: list[RunSummary], x_key: str, xlabel: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for run in runs:
        xs, ys = _val_curve(run, x_key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=run.label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_yscale("log")
    plain = plt.FuncFormatter(lambda v, _: f"{v:g}")  # 400, not 4x10^2
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def position_sweep(runs: list[RunSummary]) -> list[RunSummary]:
    """The runs of a memory-position sweep: one memory layer each, at two or more positions."""
    single = [r for r in runs if len(r.memory_layers) == 1]
    return single if len({r.memory_layers[0] for r in single}) >= 2 else []


def _by_layer_plot(runs: list[RunSummary], path: Path) -> bool:
    import matplotlib.pyplot as plt

    sweep = position_sweep(runs)
    if not sweep:
        return False
    fig, (ax_ppl, ax_use) = plt.subplots(1, 2, figsize=(10, 4))
    layers = sorted({r.memory_layers[0] for r in sweep})
    for ax, value, ylabel in (
        (ax_ppl, lambda r: r.final_ppl, "final validation perplexity"),
        (ax_use, lambda r: None if not r.memory else r.memory.get(r.memory_layers[0], {}).get("usage"), "memory usage"),
    ):
        points = [(r.memory_layers[0], value(r)) for r in sweep if value(r) is not None]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=16, alpha=0.6)
        means = [(layer, [v for i, v in points if i == layer]) for layer in layers]
        means = [(layer, sum(vs) / len(vs)) for layer, vs in means if vs]
        ax.plot([m[0] for m in means], [m[1] for m in means], marker="o")
        ax.set_xlabel("memory layer index (0-based)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(layers)
        ax.grid(True, alpha=0.3)
    for r in runs:  # dense runs in the same comparison, for reference
        if not r.memory_layers and r.final_ppl is not None:
            ax_ppl.axhline(r.final_ppl, linestyle="--", linewidth=1, color="gray")
            ax_ppl.annotate(
                r.label, (layers[0], r.final_ppl), fontsize=7, color="gray", xytext=(2, 2), textcoords="offset points"
            )
    ax_use.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    fig.suptitle("memory position sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(runs: list[RunSummary], out: Path, baseline: int = 0) -> dict[str, Any]:
    """Write table.md, table.csv and the plots into `out`; returns the markdown and the files."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs, baseline)
    notes = matching_report(runs)
    markdown = table + ("\n\n" + "\n".join(notes) if notes else "") + "\n"
    (out / "table.md").write_text(markdown)
    _write_csv(out / "table.csv", table_rows(runs, baseline))
    files = [out / "table.md", out / "table.csv"]
    plots = [
        (_curves_plot, ("tokens", "training tokens"), "ppl_vs_tokens.png"),
        (_curves_plot, ("train_time_s", "training time, s (evaluation excluded)"), "ppl_vs_time.png"),
    ]
    for fn, args, name in plots:
        if fn(runs, *args, out / name):
            files.append(out / name)
    if _by_layer_plot(runs, out / "by_layer.png"):
        files.append(out / "by_layer.png")
    return {"markdown": markdown, "files": files}


# --- knowledge capacity: recall/* columns and bits-stored plots ----------------------------------------


def recall_of(run: RunSummary) -> dict[str, Any] | None:
    """The run's latest recall metrics: the last metrics row with `recall/bits` (a training run
    with eval.recall), else `<run>/recall.json` (written by `python -m pkmlm.knowledge.sweep`, or
    pkmlm-eval's output saved there); None when neither has them."""
    import json

    rows = [r for r in run.rows if isinstance(r.get("recall/bits"), (int, float))]
    if rows:
        return rows[-1]
    path = run.path / "recall.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("recall/bits"), (int, float)) else None


RECALL_HEADERS = (
    "run",
    "people",
    "exact match",
    "answer NLL (nats)",
    "bits stored / available",
    "bits/param total",
    "bits/param active",
    "bits/param memory values",
    "params total / active / memory values / embedding",
)


def recall_markdown(runs: list[RunSummary]) -> str:
    """A table of the runs' recall metrics ("" when no run has any)."""
    lines = []
    for run in runs:
        r = recall_of(run)
        if r is None:
            continue
        counts = " / ".join(
            si(r.get(f"recall/params/{k}")) if r.get(f"recall/params/{k}") is not None else "n/a"
            for k in ("total", "active", "memory_values", "embedding")
        )
        cells = [
            run.label,
            _num(r.get("recall/people"), "d"),
            _num(r.get("recall/exact_match"), ".1%"),
            _num(r.get("recall/answer_nll"), ".3f"),
            f"{_num(r.get('recall/bits'), ',.0f')} / {_num(r.get('recall/bits_available'), ',.0f')}",
            _num(r.get("recall/bits_per_param/total"), ".4f"),
            _num(r.get("recall/bits_per_param/active"), ".4f"),
            _num(r.get("recall/bits_per_param/memory_values"), ".4f"),
            counts,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if not lines:
        return ""
    head = ["| " + " | ".join(RECALL_HEADERS) + " |", "|" + "|".join("---" for _ in RECALL_HEADERS) + "|"]
    return "\n".join(head + lines)


def _recall_points(runs: list[RunSummary]) -> dict[str, list[dict[str, float]]]:
    """The last recall row of each run that has one, grouped by run name (one arm of a sweep, e.g.
    knowledge/dense and knowledge/mem), with the parameter counts missing ones as NaN."""
    points: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        r = recall_of(run)
        if r is None or r.get("recall/people") is None:
            continue
        point = {"people": r["recall/people"], "bits": r["recall/bits"]}
        for key in ("bits_available", "params/total", "params/active", "params/memory_values"):
            point[key] = r.get(f"recall/{key}") or math.nan
        points.setdefault(run.name or run.label, []).append(point)
    return points


def _count_tick(x: float) -> str:
    """A tick label for a count: 1.22M, 300k, 64 (`si` rounds to one decimal, which would print
    1.2M twice for ticks at 1.22M and 1.24M)."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def _parameters_axis(ax: Any, xs: list[float], label: str) -> None:
    """Label a parameter-count x axis in SI units (1.22M, not 1.22e6 in an offset) with few ticks so
    neighbouring labels cannot overlap; log scale once the counts span more than a factor of 10."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    finite = [x for x in xs if x > 0 and math.isfinite(x)]
    if finite and max(finite) > 10 * min(finite):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _count_tick(x)))
    ax.set_xlabel(label)


def knowledge_plot(runs: list[RunSummary], path: Path, parameters_path: Optional[Path] = None) -> list[Path]:
    """Bits stored vs people N (`path`), and vs parameters (`parameters_path`: total parameters, and
    active parameters with the memory's value parameters as a second series), one colour per run name
    (e.g. knowledge/dense and knowledge/mem of a sweep over N), one point per run; returns the files
    written, none when fewer than two runs have recall metrics."""
    import matplotlib.pyplot as plt

    points = _recall_points(runs)
    if sum(len(p) for p in points.values()) < 2:
        return []
    colours = {name: f"C{i}" for i, name in enumerate(sorted(points))}
    fig, ax_n = plt.subplots(figsize=(5.5, 4))
    for name, pts in sorted(points.items()):
        pts.sort(key=lambda p: p["people"])
        ax_n.plot([p["people"] for p in pts], [p["bits"] for p in pts], marker="o", color=colours[name], label=name)
    available = sorted({(p["people"], p["bits_available"]) for pts in points.values() for p in pts})
    ax_n.plot(
        [a[0] for a in available],
        [a[1] for a in available],
        linestyle="--",
        color="gray",
        label="available (N x bits/person)",
    )
    ax_n.set_xlabel("people N")
    save_bits_figure(fig, (ax_n,), path)
    if parameters_path is None:
        return [path]
    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in sorted(points.items()):
        bits = [p["bits"] for p in pts]
        ax_t.scatter([p["params/total"] for p in pts], bits, color=colours[name], label=name)
        ax_a.scatter([p["params/active"] for p in pts], bits, color=colours[name], label=f"{name}: active")
        if any(p["params/memory_values"] > 0 for p in pts):
            ax_a.scatter(
                [p["params/memory_values"] for p in pts],
                bits,
                color=colours[name],
                marker="x",
                label=f"{name}: memory values",
            )
    every = [p for pts in points.values() for p in pts]
    _parameters_axis(ax_t, [p["params/total"] for p in every], "parameters (total)")
    _parameters_axis(
        ax_a,
        [p[k] for p in every for k in ("params/active", "params/memory_values")],
        "parameters (active per token; x: memory values)",
    )
    save_bits_figure(fig, (ax_t, ax_a), parameters_path)
    return [path, parameters_path]


def save_bits_figure(fig: Any, axes: tuple, path: Path) -> None:
    """Label every panel's y axis as bits stored, add grids and legends, write `path`, close."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_ylabel("bits stored (recall/bits)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_recall_report(runs: list[RunSummary], out: Path) -> dict[str, Any]:
    """`recall.md`, `bits_vs_people.png` and `bits_vs_parameters.png` in `out` for the runs with
    recall metrics; returns the markdown ("" when none has any) and the files written."""
    markdown = recall_markdown(runs)
    files: list[Path] = []
    if markdown:
        (out / "recall.md").write_text(markdown + "\n")
        files.append(out / "recall.md")
        files += knowledge_plot(runs, out / "bits_vs_people.png", out / "bits_vs_parameters.png")
    return {"markdown": markdown, "files": files}


# --- memory variants (issue 14): which recipe each run is, its size, cost and memory statistics ----------


def variant_name(memory: dict) -> str:
    """The memory recipe a run's `model.memory` config describes, e.g. `dense`, `PKM (replace)`,
    `Memory+ (replace, qk-norm, shared pool)`. The base name is the registered variant's
    (`pkmlm.model.variants.label_of`: the describing variant of highest precedence, e.g. PEER values
    with a balance loss -> UltraMem-style); the details list the placement, the variants' own
    (`MemoryVariant.details`: qk-norm, the balance-loss coefficient) and a pool shared by several
    layers."""
    layers = memory.get("layers") or []
    if not layers and not any(v.side_layers(memory) for v in variants.side_variants()):
        return "dense"
    extra = [(0, str(memory.get("placement") or "replace"))] if layers else []
    if memory.get("share_values") and len(layers) > 1:
        extra.append((20, "shared pool"))
    return f"{variants.label_of(memory)} ({', '.join(variants.details_of(memory, extra))})"


def _recipes(names: list[str]) -> set[str]:
    """The distinct memory recipes among variant names (`PKM (replace)` and `PKM (parallel)` are one
    recipe, PKM; a memory-position sweep is one recipe at several depths, not a variants comparison)."""
    return {name.split(" (")[0] for name in names} - {"dense"}


def _run_variant(run: RunSummary) -> str:
    memory = (run.config.get("model") or {}).get("memory") if isinstance(run.config.get("model"), dict) else None
    return variant_name(memory if isinstance(memory, dict) else {})


def _values_optim_text(run: RunSummary) -> str:
    """The values' optimizer settings: LR, its schedule, and their own clip when they have one."""
    optim = run.config.get("optim") if isinstance(run.config.get("optim"), dict) else {}
    if not run.memory_layers:
        return "—"
    clip = optim.get("values_grad_clip") or 0
    return f"{_num(optim.get('values_lr'), 'g')} {optim.get('values_schedule', 'follow')}" + (
        f", clip {clip:g} apart" if clip else ""
    )


def _mean_stat(run: RunSummary, stat: str) -> float | None:
    values = [m.get(stat) for m in run.memory.values() if isinstance(m.get(stat), (int, float))]
    return sum(values) / len(values) if values else None


def _last_row_value(run: RunSummary, key: str) -> float | None:
    values = [r[key] for r in run.rows if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


VARIANT_HEADERS = (
    "variant",
    "run",
    "memory layers",
    "values optim",
    "params total / active",
    "FLOPs/token",
    "train tok/s",
    "final val ppl",
    "ppl ×",
    "usage (mean)",
    "KL weight (mean)",
    "train balance loss",
)


def variants_markdown(runs: list[RunSummary], baseline: int = 0) -> str:
    """One row per run naming its memory variant, with its parameters (total / active), training
    FLOPs per token, speed, final validation perplexity (and its ratio to the baseline's), memory
    usage and KL averaged over its memory layers, and its last logged balance loss; "" unless the
    runs hold at least two memory variants (dense runs then join as references)."""
    names = [_run_variant(r) for r in runs]
    if len(_recipes(names)) < 2:
        return ""
    base = runs[baseline]
    lines = ["| " + " | ".join(VARIANT_HEADERS) + " |", "|" + "|".join("---" for _ in VARIANT_HEADERS) + "|"]
    for name, r in zip(names, runs):
        usage = _mean_stat(r, "usage")
        cells = [
            name,
            f"**{r.label}** (baseline)" if r is base else r.label,
            ", ".join(f"L{i}" for i in r.memory_layers) or "none",
            _values_optim_text(r),
            f"{si(r.params_total, 2)} / {si(r.params_active, 2)}",
            si(r.flops_per_token, 1),
            si(r.tokens_per_s, 2),
            _num(r.final_ppl, ".2f"),
            _num(_ratio(r.final_ppl, base.final_ppl), ".3f"),
            "—" if not r.memory_layers else _num(usage, ".1%"),
            "—" if not r.memory_layers else _num(_mean_stat(r, "kl_weight"), ".2f"),
            _num(balance, ".4f") if (balance := _last_row_value(r, "train/balance_loss")) is not None else "—",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def variants_plot(runs: list[RunSummary], path: Path) -> bool:
    """Final validation perplexity, training tokens/s and mean memory usage per run, one bar each,
    labelled by variant; False when fewer than two memory variants."""
    import matplotlib.pyplot as plt

    names = [_run_variant(r) for r in runs]
    if len(_recipes(names)) < 2:
        return False
    # the base name over its placement (the table has the rest)
    labels = [
        n.split(" (")[0].replace("-style", "")
        + ("\n" + n.split(" (", 1)[1].split(",")[0].rstrip(")") if " (" in n else "")
        for n in names
    ]
    panels = (
        ("final validation perplexity", [r.final_ppl for r in runs]),
        ("training tokens/s", [r.tokens_per_s for r in runs]),
        ("memory usage (mean over layers)", [_mean_stat(r, "usage") for r in runs]),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (title, values) in zip(axes, panels):
        xs = range(len(runs))
        ax.bar(
            xs,
            [v if isinstance(v, (int, float)) and math.isfinite(v) else 0 for v in values],
            color=["gray" if not r.memory_layers else f"C{i}" for i, r in enumerate(runs)],
        )
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[2].yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    finite = [r.final_ppl for r in runs if isinstance(r.final_ppl, (int, float)) and math.isfinite(r.final_ppl)]
    if finite:  # differences of a few percent: start the axis near the lowest bar
        axes[0].set_ylim(min(finite) * 0.95, max(finite) * 1.02)
    fig.suptitle("memory variants (pkmlm-compare)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_variants_report(runs: list[RunSummary], out: Path, baseline: int = 0) -> dict[str, Any]:
    """`variants.md` and `variants.png` in `out` when the runs hold two or more memory variants (a
    pkm-vs-dense comparison or a sweep of one recipe gets neither);
    returns the markdown ("" otherwise) and the files written."""
    markdown = variants_markdown(runs, baseline)
    files: list[Path] = []
    if markdown:
        (out / "variants.md").write_text(markdown + "\n")
        files.append(out / "variants.md")
        if variants_plot(runs, out / "variants.png"):
            files.append(out / "variants.png")
    return {"markdown": markdown, "files": files}
