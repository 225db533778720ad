"""Diffusion Posterior Sampling (Chung et al., ICLR 2023) with the semantics of the released code (methods.md §2).

    x_N ~ init_std * N(0, I)                                    # drawn from the generator (or x_init)
    for i = 0 .. N-1:                       (grid of (s_i, sigma_i), ending at sigma = 0)
        x0_hat = D(x_i / s_i, sigma_i)                          # prior.denoise; optionally clipped to the data range
        x'     = s_{i+1} * DDIM_eta(x_i / s_i -> sigma_{i+1})   # eta = 1: DDPM ancestral step
        g      = grad_{x_i} ||y - A(decode(x0_hat))||           # per sample, the norm, not squared, through D
        x_{i+1} = x' - zeta * g
    return decode(x_0)

On a VP grid (``vp_grid``) the state is the DDPM x_t and this is DPS as released; on an EDM grid (s = 1) it is the
EDM-grid variant. ``norm: l2_squared`` uses ||.||^2 instead. The MCGdiff GMM script's DPS is a different variant:
it steps on grad ||r||^2 / ||r|| (= 2 grad ||r||, i.e. ``zeta`` doubled), with the decreasing betas and eta = 0.85
(``conf/solver/dps_mcgdiff.yaml``; exact_posterior.md §5). The default (``conf/solver/dps.yaml``) is the released code.
With a latent prior (``decode`` not the identity) this is latent DPS.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffinv_pl.diffusion.schedules import SamplingGrid
from diffinv_pl.diffusion.steps import ddim_step
from diffinv_pl.solvers.base import (
    Callback,
    CountingDenoiser,
    InverseProblem,
    SolverResult,
    check_finite,
    cost_meter,
    initial_state,
)
from diffinv_pl.priors.base import Prior
from diffinv_pl.utils.random import GeneratorLike

NORMS = ("l2", "l2_squared")


def dps_guidance(
    problem: InverseProblem,
    denoiser: Prior | CountingDenoiser,
    x: Tensor,
    scale: float,
    sigma: float,
    norm: str = "l2",
    clip_denoised: tuple[float, float] | None = None,
    generator: GeneratorLike = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DPS guidance at state x = s (x0 + sigma n): returns (grad_x loss, x0_hat, per-sample residual norms, x / s).

    loss = sum_b ||y - A(decode(x0_hat_b))|| (``l2``) or its square (``l2_squared``), x0_hat = D(x / s, sigma), so
    that grad = J_D^T A^T (A x0_hat - y) / (s ||A x0_hat - y||) per sample for ``l2`` and a pixel prior.
    """
    counted = denoiser if isinstance(denoiser, CountingDenoiser) else CountingDenoiser(denoiser)
    x = x.detach().requires_grad_(True)
    x_norm = x / scale
    denoised = counted(x_norm, torch.as_tensor(sigma, dtype=x.dtype, device=x.device), generator=generator)
    if clip_denoised is not None:
        denoised = denoised.clamp(*clip_denoised)
    image = counted.prior.decode(denoised)
    residual = problem.operator.residual_norm(problem.y - problem.operator(image))
    loss = residual.sum() if norm == "l2" else residual.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad, denoised.detach(), residual.detach(), x_norm.detach()


def dps(
    problem: InverseProblem,
    prior: Prior,
    *,
    grid: SamplingGrid,
    zeta: float = 1.0,
    norm: str = "l2",
    eta: float = 1.0,
    clip_denoised: tuple[float, float] | None = None,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """Run DPS; see the module docstring. ``zeta`` is the guidance step size, ``clip_denoised`` the data range.

    Starts from ``grid.init_std * N(0, I)`` drawn from ``generator`` unless ``x_init`` is given."""
    if norm not in NORMS:
        raise ValueError(f"unknown DPS norm {norm!r}; valid: {', '.join(NORMS)}")
    if not zeta >= 0 or not eta >= 0:
        raise ValueError(f"zeta and eta must be >= 0, got zeta={zeta}, eta={eta}")
    if clip_denoised is not None and not (len(clip_denoised) == 2 and clip_denoised[0] < clip_denoised[1]):
        raise ValueError(f"clip_denoised must be [lo, hi] with lo < hi, got {clip_denoised}")
    x_init = initial_state(problem, prior, grid.init_std, generator, x_init)
    counted = CountingDenoiser(prior)
    sigmas, scales = grid.sigmas.tolist(), grid.scales.tolist()
    with cost_meter(problem, counted) as cost:
        x = x_init
        for i in range(grid.num_steps):
            sigma, sigma_next, s, s_next = sigmas[i], sigmas[i + 1], scales[i], scales[i + 1]
            grad, denoised, residual, x_norm = dps_guidance(
                problem, counted, x, s, sigma, norm, clip_denoised, generator
            )
            # A NaN/Inf state shows up in the next residual; checking the (P, n) norms is cheaper than the state.
            check_finite(residual, "DPS residual", i, sigma, f"reduce zeta (now {zeta}) or check the denoiser and operator")
            x_next = ddim_step(x_norm, denoised, sigma, sigma_next, eta, generator)
            x = torch.add(x_next.mul_(s_next), grad, alpha=-zeta)
            if callback is not None:
                callback({"step": i, "sigma": sigma, "x": x, "denoised": denoised, "residual": residual})
        check_finite(x, "DPS state", grid.num_steps - 1, sigmas[-2], f"reduce zeta (now {zeta})")
        samples = prior.decode(x)
    return SolverResult(samples, cost)
