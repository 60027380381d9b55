"""Number formats shared by the console (metrics/sinks.py) and the comparison report
(experiments/report.py): one spelling of a token count, a duration and a missing value."""

from __future__ import annotations

import math
from typing import Any, Optional

MISSING = "n/a"  # a value not measured, null or non-finite


def si(value: Optional[float], digits: int = 1) -> str:
    """12345678 -> '12.3M' (token counts and rates); None -> 'n/a'."""
    if value is None:
        return MISSING
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f}{unit}"
    return f"{value:.0f}"


def duration(seconds: Optional[float]) -> str:
    """3723 -> '1h02m03s'; None or non-finite -> 'n/a'."""
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def number(value: Any, fmt: str) -> str:
    """`format(value, fmt)`, or 'n/a' for None, a non-finite float or a value that is no number."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    if isinstance(value, float) and not math.isfinite(value):
        return MISSING
    return format(value, fmt)
