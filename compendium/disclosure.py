"""Statistical disclosure control for everything a person reads.

Aggregate cells that count fewer than `MIN_CELL` patients are suppressed
(shown as "<5"), and so is a cell whose complement in its group is below
`MIN_CELL` (otherwise it could be recovered by subtraction).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

MIN_CELL = 5
SUPPRESSED = f"<{MIN_CELL}"


def is_small(count: np.ndarray | pd.Series | int) -> np.ndarray:
    """Return True where a count is positive and below MIN_CELL."""
    count = np.asarray(count)
    return (count > 0) & (count < MIN_CELL)


def count_cell(count: int, total: int | None = None) -> str:
    """Return a count for display, suppressed if it (or total - count) is small."""
    if is_small(count) or (total is not None and is_small(total - count)):
        return SUPPRESSED
    return f"{int(count):,}"


def count_percent_cell(count: int, total: int) -> str:
    """Return 'n (p%)' for display, suppressed if n or total - n is small."""
    if is_small(count) or is_small(total - count):
        return SUPPRESSED
    percent = 100.0 * count / total if total else 0.0
    return f"{int(count):,} ({percent:.1f}%)"


def suppress_counts(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Return a copy with small counts in `columns` replaced by NaN (for plotting)."""
    out = frame.copy()
    for column in columns:
        out[column] = out[column].astype(float).mask(is_small(out[column].to_numpy()))
    return out
