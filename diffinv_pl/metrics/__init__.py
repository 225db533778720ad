"""Metrics: sample-based posterior distances (SW1, mode-weight TV); image metrics come with the evaluation task."""

from diffinv_pl.metrics.sliced_wasserstein import (
    mode_weight_tv,
    random_directions,
    sliced_wasserstein_1,
    sliced_wasserstein_1_sorted,
    sorted_projections,
)

__all__ = ["mode_weight_tv", "random_directions", "sliced_wasserstein_1", "sliced_wasserstein_1_sorted", "sorted_projections"]
