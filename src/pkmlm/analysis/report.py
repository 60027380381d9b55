"""The inspection report: `report.md` (overview) and `layer{i}.md` per memory layer with its PNGs,
plus `summary.json` (every number and context, machine-readable).

Per layer: read counts and the statistics of `MemoryUsage` (usage = fraction of slots read at
least once; dead = never read, over the data inspected; KL to uniform and Gini of the weights),
per head the same, a log-log histogram of reads per slot, the contexts that read the most-read
slots and a random sample of slots hardest, and usage/KL at each checkpoint the run kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pkmlm.analysis.slots import LayerCounts, SlotContexts

# Tokens shown after the triggering one (what the model was predicting, for reading the context).
FOLLOWING_TOKENS = 3


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot_access_histogram(count_S: Tensor, path: Path, title: str) -> None:
    """Slots per read count, both axes log scale; never-read slots as a separate bar at 0."""
    plt = _plt()
    count_S = count_S.double()
    dead = int((count_S == 0).sum())
    read = count_S[count_S > 0]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if read.numel():
        top = max(float(read.max()), 1.0)
        edges = torch.logspace(
            0, math.log10(top) + 1e-9, steps=min(40, max(2, int(math.log2(top)) + 2)), dtype=torch.float64
        )
        edges = torch.unique(torch.cat([edges, torch.tensor([top + 1.0], dtype=torch.float64)]))
        hist = torch.histogram(read, bins=edges).hist
        ax.stairs(hist.numpy(), edges.numpy(), fill=True, alpha=0.8, label="read slots")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("reads per slot (all heads)")
    ax.set_ylabel("slots")
    ax.set_title(f"{title}: {dead} of {count_S.numel()} slots never read")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heads(stats: dict[str, float], heads: int, path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.0))
    for ax, (key, label) in zip(
        axes, (("usage", "usage"), ("kl_weight", "KL to uniform (nats)"), ("gini", "Gini of weights"))
    ):
        ax.bar(range(heads), [stats[f"head{h}/{key}"] for h in range(heads)])
        ax.set_xticks(range(heads))
        ax.set_xlabel("head")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(points: list[dict], layer: int, path: Path, title: str) -> None:
    plt = _plt()
    steps = [p["step"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.2))
    for ax, key, label in ((axes[0], "usage", "usage"), (axes[1], "kl_weight", "KL to uniform (nats)")):
        ax.plot(steps, [p["layers"][str(layer)][key] for p in points], marker="o")
        ax.set_xlabel("step")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- text -----------------------------------------------------------------------------------------


def _text(tokenizer, token_ids: list[int]) -> str:
    """Decoded in one piece (a character split over tokens stays whole), one line, safe in a
    markdown code span and table."""
    text = tokenizer.decode(token_ids) if token_ids else ""
    return text.replace("\n", "⏎").replace("`", "ˋ").replace("|", "¦")


def context_text(tokenizer, batch_BT1: Tensor, row: int, position: int, window: int) -> str:
    """`…left ⟦trigger⟧ next…`: `window` tokens before the trigger, and the few after it."""
    seq = batch_BT1[row].tolist()
    left = _text(tokenizer, seq[max(0, position - window) : position])
    right = _text(tokenizer, seq[position + 1 : position + 1 + FOLLOWING_TOKENS])
    start = "…" if position > window else ""
    return f"{start}{left}⟦{_text(tokenizer, [seq[position]])}⟧{right}…"


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _contexts_md(group: Sequence[SlotContexts], batches: Sequence[Tensor], tokenizer, window: int) -> list[str]:
    lines = []
    for slot in group:
        lines.append(f"- **slot {slot.slot}** ({slot.reads} reads)" + ("" if slot.contexts else ": never read"))
        for c in slot.contexts:
            text = context_text(tokenizer, batches[c.batch], c.row, c.position, window)
            lines.append(f"  - `{text}` (weight {c.weight:.3f})")
    return lines


def layer_markdown(
    layer: int,
    counts: LayerCounts,
    most: Sequence[SlotContexts],
    sampled: Sequence[SlotContexts],
    history: list[dict],
    batches: Sequence[Tensor],
    tokenizer,
    window: int,
) -> str:
    s, n_slots, heads = counts.stats, counts.count.numel(), counts.count_per_head.shape[0]
    reads = int(counts.count.sum())
    lines = [
        f"# Memory layer {layer}",
        "",
        f"{n_slots:,} slots, {heads} heads, {reads:,} reads over the data inspected.",
        "",
        "| usage | dead slots | KL weight | KL count | Gini | slots for 50 / 90 / 99 % of weight |",
        "|---|---|---|---|---|---|",
        (
            f"| {_fmt(s['usage'], '.2%')} | {_fmt(1 - s['usage'], '.2%')} | {_fmt(s['kl_weight'], '.3f')} | "
            f"{_fmt(s['kl_count'], '.3f')} | {_fmt(s['gini'], '.3f')} | {_fmt(s['top50'], '.0f')} / "
            f"{_fmt(s['top90'], '.0f')} / {_fmt(s['top99'], '.0f')} |"
        ),
        "",
        f"![reads per slot](layer{layer}_access.png)",
        "",
        "## Heads",
        "",
        "| head | usage | KL weight | KL count | Gini |",
        "|---|---|---|---|---|",
    ]
    for h in range(heads):
        lines.append(
            f"| {h} | {_fmt(s[f'head{h}/usage'], '.2%')} | {_fmt(s[f'head{h}/kl_weight'], '.3f')} | "
            f"{_fmt(s[f'head{h}/kl_count'], '.3f')} | {_fmt(s[f'head{h}/gini'], '.3f')} |"
        )
    lines += [
        "",
        f"![per head](layer{layer}_heads.png)",
        "",
        "## Most-read slots",
        "",
        (
            "The tokens that gave each slot its largest read weight (summed over heads); the triggering "
            f"token in ⟦ ⟧, with {window} tokens before it and {FOLLOWING_TOKENS} after."
        ),
        "",
    ]
    lines += _contexts_md(most, batches, tokenizer, window)
    lines += ["", "## A random sample of slots", ""]
    lines += _contexts_md(sampled, batches, tokenizer, window)
    lines += ["", "## Over the run's checkpoints", ""]
    if len(history) >= 1:
        lines += [
            f"![usage and KL per checkpoint](layer{layer}_history.png)",
            "",
            "| step | usage | KL weight |",
            "|---|---|---|",
        ]
        lines += [
            f"| {p['step']} | {_fmt(p['layers'][str(layer)]['usage'], '.2%')} | "
            f"{_fmt(p['layers'][str(layer)]['kl_weight'], '.3f')} |"
            for p in history
        ]
    else:
        lines.append("No checkpoint history (inspecting a single checkpoint or export).")
    return "\n".join(lines) + "\n"


def write_report(
    out: Path,
    *,
    source: dict[str, Any],
    counts: dict[int, LayerCounts],
    contexts: dict[int, list[SlotContexts]],
    n_most: dict[int, int],
    history: list[dict],
    batches: Sequence[Tensor],
    tokenizer,
    window: int,
    side: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write the report into `out` (created); returns `out/report.md`. `contexts[i]` lists the
    most-read slots first (`n_most[i]` of them), then the random sample. `side`: the side layers'
    statistics and description lines (`pkmlm.analysis.side.inspect_side_layers`), a section each."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"source": source, "layers": {}, "history": history}
    index = [
        f"# Memory inspection: {source.get('checkpoint', '')}",
        "",
        (
            f"Step {source.get('step')}; data: {', '.join(map(str, source.get('files', []))) or 'n/a'}; "
            f"{source.get('tokens', 0):,} tokens in {len(batches)} batches."
        ),
    ]
    if counts:  # product-key memory layers (a model may have only side layers)
        index += ["", "| layer | slots | usage | dead | KL weight | Gini | report |", "|---|---|---|---|---|---|---|"]
    for layer in sorted(counts):
        c = counts[layer]
        most, sampled = contexts[layer][: n_most[layer]], contexts[layer][n_most[layer] :]
        plot_access_histogram(c.count, out / f"layer{layer}_access.png", f"layer {layer}")
        plot_heads(c.stats, c.count_per_head.shape[0], out / f"layer{layer}_heads.png", f"layer {layer}")
        if history:
            plot_history(history, layer, out / f"layer{layer}_history.png", f"layer {layer}")
        (out / f"layer{layer}.md").write_text(
            layer_markdown(layer, c, most, sampled, history, batches, tokenizer, window)
        )
        index.append(
            f"| {layer} | {c.count.numel():,} | {_fmt(c.stats['usage'], '.2%')} | "
            f"{_fmt(1 - c.stats['usage'], '.2%')} | {_fmt(c.stats['kl_weight'], '.3f')} | "
            f"{_fmt(c.stats['gini'], '.3f')} | [layer{layer}.md](layer{layer}.md) |"
        )

        def slots_json(group: Sequence[SlotContexts]) -> list[dict]:
            return [
                {
                    "slot": g.slot,
                    "reads": g.reads,
                    "contexts": [
                        {**asdict(ctx), "tokens": batches[ctx.batch][ctx.row, : ctx.position + 1].tolist()}
                        for ctx in g.contexts
                    ],
                }
                for g in group
            ]

        summary["layers"][str(layer)] = {
            "stats": c.stats,
            "reads": int(c.count.sum()),
            "dead_fraction": 1 - c.stats["usage"],
            "count_per_slot": c.count.tolist(),
            "most_read": slots_json(most),
            "random": slots_json(sampled),
        }
    summary["side_layers"] = side or {}
    for prefix, entry in (side or {}).items():
        stats = entry["stats"]
        usage = ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in stats.items())
        index += ["", f"## {prefix}", "", f"Usage statistics: {usage}.", "", "```", *entry["lines"], "```"]
    (out / "summary.json").write_text(json.dumps(summary, allow_nan=True) + "\n")
    (out / "report.md").write_text("\n".join(index) + "\n")
    return out / "report.md"
