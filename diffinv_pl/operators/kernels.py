"""Blur-kernel generators (methods.md §1.2 and §7): Gaussian, uniform (box) and random-trajectory motion kernels.

Every function returns a float64 ``(size, size)`` tensor on the CPU, non-negative and normalised to sum 1, with its
centre at index ``(size // 2, size // 2)`` (odd sizes, as the blur operators require).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"kernel size must be a positive integer, got {size!r}")
    return int(size)


def _reflect_index(t: Tensor, n: int) -> Tensor:
    """Map integer positions onto 0..n-1 by half-sample symmetric reflection (scipy ``mode='reflect'``: d c b a | a b
    c d | d c b a), repeated periodically (period 2n) for positions further out than one reflection."""
    t = torch.remainder(t, 2 * n)
    return torch.where(t >= n, 2 * n - 1 - t, t)


def _gaussian_delta_1d(size: int, std: float, truncate: float) -> Tensor:
    """1-D scipy ``gaussian_filter1d`` (mode 'reflect') of a delta at ``size // 2``."""
    radius = int(truncate * float(std) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / float(std)) ** 2)
    weights = weights / weights.sum()
    centre = size // 2
    positions = torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)[None, :]  # (size, taps)
    hits = (_reflect_index(positions, size) == centre).to(torch.float64)
    return hits @ weights


def gaussian_kernel(size: int = 61, std: float = 3.0, truncate: float = 4.0) -> Tensor:
    """Gaussian blur kernel: scipy ``ndimage.gaussian_filter`` (mode 'reflect', ``truncate`` 4) of a centred delta.

    The filter is separable and so is the delta, so the 2-D result is the outer product of the 1-D filtered delta;
    this is exactly what scipy computes (including the reflected tails when ``truncate * std`` exceeds ``size // 2``,
    e.g. the 9x9 std-3 kernel of CoDPS super-resolution). The result is renormalised to sum 1 (a no-op when the tails
    fit inside the grid, as for the default 61x61, std 3).
    """
    size = _check_size(size)
    if not std > 0:
        raise ValueError(f"Gaussian std must be > 0, got {std}")
    g = _gaussian_delta_1d(size, std, truncate)
    k = torch.outer(g, g)
    return k / k.sum()


def uniform_kernel(size: int = 17) -> Tensor:
    """Uniform (box) kernel of ``size x size`` equal weights (PaDIS uses 17x17)."""
    size = _check_size(size)
    return torch.full((size, size), 1.0 / (size * size), dtype=torch.float64)


def _splat_bilinear(points: Tensor, size: int) -> Tensor:
    """Accumulate unit-mass points ``(N, 2)`` = (row, col) onto a size x size grid with bilinear weights.

    Bilinear splatting preserves the mass and the first moments of the points exactly (all points must lie in
    [0, size - 1]).
    """
    r0 = points[:, 0].floor().clamp(0, size - 1)
    c0 = points[:, 1].floor().clamp(0, size - 1)
    fr = points[:, 0] - r0
    fc = points[:, 1] - c0
    r1 = (r0 + 1).clamp(max=size - 1)
    c1 = (c0 + 1).clamp(max=size - 1)
    grid = torch.zeros(size * size, dtype=torch.float64)
    for rr, cc, w in (
        (r0, c0, (1 - fr) * (1 - fc)),
        (r0, c1, (1 - fr) * fc),
        (r1, c0, fr * (1 - fc)),
        (r1, c1, fr * fc),
    ):
        grid.index_add_(0, (rr * size + cc).long(), w)
    return grid.reshape(size, size)


def motion_kernel(
    size: int = 61,
    intensity: float = 0.5,
    generator: torch.Generator | None = None,
    num_steps: int = 64,
) -> Tensor:
    """Random camera-shake motion-blur kernel (our own model; not a port of any published generator).

    Model. The kernel is the exposure-time density of a point moving along a random camera-shake trajectory, sampled
    at ``num_steps`` equal time steps:

    * heading: starts at a uniform random angle; its turn rate follows an AR(1) process (momentum / inertia)
      ``omega_{k+1} = 0.8 omega_k + 0.08 * intensity * xi_k`` and the heading integrates it, so the path bends
      smoothly; in addition, at each step a sudden "jerk" happens with probability ``0.05 * intensity`` and turns the
      heading by ``U(-1, 1) * pi * intensity`` (abrupt shake reversals);
    * speed: log-normal, ``exp(0.6 * intensity * s_k)`` with ``s_k`` a unit-variance AR(1) process (coefficient
      0.9), so the camera slows down and speeds up; slow stretches collect more exposure and appear brighter;
    * size: the trajectory is centred on its time-average and scaled so that its largest half-extent (over rows and
      columns) is ``U(0.4, 1) * (size // 2 - 1)`` pixels; it is resampled (linear interpolation in time) finely
      enough that consecutive samples are at most 0.25 px apart, then rasterised with bilinear splatting.

    ``intensity`` in [0, 1] sets the irregularity: 0 gives a straight, uniform-speed line segment (random direction
    and length); larger values give more curvature, more frequent and larger jerks and more speed variation; 1 gives
    strongly winding, clumpy kernels. Bilinear splatting preserves first moments, so the kernel's centre of mass is at
    its centre ``(size // 2, size // 2)`` (to rounding). Every random number comes from ``generator`` (``None``: the
    global torch generator, not reproducible): the same generator state gives the identical kernel.
    """
    size = _check_size(size)
    if size < 5:
        raise ValueError(f"motion kernels need size >= 5, got {size}")
    if not 0.0 <= float(intensity) <= 1.0:
        raise ValueError(f"motion-blur intensity must be in [0, 1], got {intensity}")
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    a = float(intensity)
    n = int(num_steps)
    f64 = torch.float64

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=f64)

    def normal(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=f64)

    # A fixed number of draws per kernel, whatever the intensity, so that the generator advances identically.
    heading0 = 2 * math.pi * uniform(1)[0]
    half_extent_frac = 0.4 + 0.6 * uniform(1)[0]
    turn_noise = normal(n)
    jerk_happens = uniform(n) < 0.05 * a
    jerk_angle = (2 * uniform(n) - 1) * math.pi * a
    speed_noise = normal(n)

    omega = torch.zeros((), dtype=f64)
    s = speed_noise[0]
    heading = heading0
    steps = torch.empty(n, 2, dtype=f64)
    for k in range(n):
        omega = 0.8 * omega + 0.08 * a * turn_noise[k]
        heading = heading + omega + torch.where(jerk_happens[k], jerk_angle[k], torch.zeros((), dtype=f64))
        if k > 0:
            s = 0.9 * s + math.sqrt(1 - 0.81) * speed_noise[k]
        speed = torch.exp(0.6 * a * s)
        steps[k, 0] = speed * torch.sin(heading)
        steps[k, 1] = speed * torch.cos(heading)
    path = torch.cat([torch.zeros(1, 2, dtype=f64), steps.cumsum(0)])  # (n + 1, 2) positions at equal times

    half = size // 2
    target = half_extent_frac * (half - 1)
    # Resample finely in time: step in pixels <= 0.25 after scaling (the extent proxy is the bounding-box half-width).
    extent_proxy = ((path.amax(0) - path.amin(0)).amax() / 2).clamp(min=1e-12)
    max_step_px = float(steps.norm(dim=1).max() * target / extent_proxy)
    factor = max(1, math.ceil(max_step_px / 0.25))
    if factor > 1:
        path = F.interpolate(path.T[None], size=n * factor + 1, mode="linear", align_corners=True)[0].T
    path = path - path.mean(0)
    scale = target / path.abs().amax().clamp(min=1e-12)
    points = path * scale + half
    kernel = _splat_bilinear(points, size)
    return kernel / kernel.sum()


__all__ = ["gaussian_kernel", "motion_kernel", "uniform_kernel"]
