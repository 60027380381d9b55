"""Perplexity and memory-usage statistics (accumulated on device) and the logging sinks.

``memory_usage`` and ``evaluate`` need only torch. The sinks (tqdm, and wandb when enabled) are
loaded on first use of one of their names, so ``import pkmlm.metrics`` stays torch-only.
"""

from __future__ import annotations

import importlib
from typing import Any

from pkmlm.metrics.evaluate import bits_per_byte, evaluate, perplexity
from pkmlm.metrics.memory_usage import (
    MemoryUsage,
    attach_usage_trackers,
    detach_usage_trackers,
    gini,
    kl_to_uniform,
    memory_metrics,
    slots_for_mass,
    track_memory_usage,
    usage_fraction,
)

_SINK_NAMES = (
    "MetricsFile",
    "read_metrics",
    "latest_by_step",
    "ConsoleProgress",
    "WandbSink",
    "Sinks",
    "format_summary",
)

__all__ = [
    "evaluate",
    "bits_per_byte",
    "perplexity",
    "MemoryUsage",
    "attach_usage_trackers",
    "detach_usage_trackers",
    "track_memory_usage",
    "memory_metrics",
    "usage_fraction",
    "kl_to_uniform",
    "gini",
    "slots_for_mass",
    *_SINK_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _SINK_NAMES:
        return getattr(importlib.import_module("pkmlm.metrics.sinks"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
