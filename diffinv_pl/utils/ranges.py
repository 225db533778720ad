"""The one documented transform between image ranges: affine map of [lo_src, hi_src] onto [lo_dst, hi_dst].

PaDIS CT works on [0, 1], the DPS family (DPS, ReSample, DAPS, CoDPS) on [-1, 1]; x_dst = lo_dst + (x - lo_src)
(hi_dst - lo_dst) / (hi_src - lo_src). Metrics (PSNR/SSIM/LPIPS) state their own expected range.
"""

from __future__ import annotations

from torch import Tensor

UNIT = (0.0, 1.0)
SYMMETRIC = (-1.0, 1.0)


def convert_range(x: Tensor, src: tuple[float, float], dst: tuple[float, float]) -> Tensor:
    """Affinely map values of range ``src`` onto range ``dst`` (no clipping)."""
    (a, b), (c, d) = src, dst
    if not (b > a and d > c):
        raise ValueError(f"ranges must be increasing intervals, got {src} -> {dst}")
    if (a, b) == (c, d):
        return x
    return c + (x - a) * ((d - c) / (b - a))
