"""Metrics: sample-based posterior distances (SW1, mode-weight TV) and the pinned image-metric protocol
(PSNR, SSIM, LPIPS, FID; :mod:`diffinv_pl.metrics.image`, weights offline via :mod:`diffinv_pl.metrics.weights`)."""

from diffinv_pl.metrics.sliced_wasserstein import (
    mode_weight_tv,
    random_directions,
    sliced_wasserstein_1,
    sliced_wasserstein_1_sorted,
    sorted_projections,
)

__all__ = ["mode_weight_tv", "random_directions", "sliced_wasserstein_1", "sliced_wasserstein_1_sorted", "sorted_projections"]
