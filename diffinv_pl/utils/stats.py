"""Aggregation over problems: mean and the half-width of the normal 95% interval, 1.96 std / sqrt(n)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) with the sample standard deviation (ddof = 1; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)
